//! Faults of the host, injected under the real daemon: the checkpoint
//! directory full (a real tmpfs filled to ENOSPC) or read-only (remounted
//! ro), and the sevflush module unloading and loading while the agent reads
//! it. For each: the daemon keeps serving, reports the condition in GetHost
//! and /metrics, accepts the change again once the fault heals, and no
//! acknowledged intent is lost across kill -9.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sevplace_proto::v1 as pb;
use sevplace_tests::{metric_value, skip, wait_until, Daemon, GuestVm};

fn genoa() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/genoa-2x96-nps1")
}

fn place(id: &str) -> pb::PlaceVmRequest {
    pb::PlaceVmRequest {
        vm_id: id.to_string(),
        vcpus: 4,
        confidential_class: pb::ConfidentialClass::SevSnp as i32,
        ..Default::default()
    }
}

/// A tmpfs mounted on a directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (with a printed reason) when mounting is not possible here.
    fn mount(test: &str, at: &Path, size: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            skip(test, "root", "mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("mount");
        if !out.status.success() {
            skip(
                test,
                "tmpfs-mount",
                format_args!(
                    "mount -t tmpfs failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
            return None;
        }
        Some(Self(at.to_path_buf()))
    }

    fn remount(&self, opt: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .output()
            .expect("mount -o remount");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with one file until ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 4096];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.sync_all();
    path
}

fn conditions(c: &mut Client, rt: &tokio::runtime::Runtime) -> Vec<(i32, String)> {
    rt.block_on(c.get_host(pb::GetHostRequest {}))
        .expect("GetHost keeps answering")
        .into_inner()
        .host
        .expect("host")
        .conditions
        .into_iter()
        .map(|c| (c.r#type, c.message))
        .collect()
}

fn listed(c: &mut Client, rt: &tokio::runtime::Runtime) -> Vec<String> {
    let mut ids: Vec<String> = rt
        .block_on(c.list_vms(pb::ListVmsRequest::default()))
        .expect("ListVms keeps answering")
        .into_inner()
        .vms
        .into_iter()
        .map(|v| v.vm_id)
        .collect();
    ids.sort();
    ids
}

type Client =
    sevplace_proto::v1::sevplace_service_client::SevplaceServiceClient<tonic::transport::Channel>;

/// The value of `series` in the daemon's /metrics; it must be there.
fn metric(d: &Daemon, series: &str) -> f64 {
    metric_value(&d.metrics_addr, series).unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[test]
fn checkpoint_directory_full_or_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(fs) = Tmpfs::mount("checkpoint_directory_full_or_read_only", &state, "512k") else {
        return;
    };
    let root = host_root_copy();
    let host_root = root.path().to_str().unwrap();
    let d = Daemon::start_in(dir, &["--host-root", host_root], &[]);
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    rt.block_on(c.place_vm(place("vm-a"))).expect("place vm-a");

    // Full: the call is refused with UNAVAILABLE (retryable), nothing
    // changes, the condition is up.
    let filler = fill(&state);
    let err = rt.block_on(c.place_vm(place("vm-b"))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("No space left"), "{}", err.message());
    let err = rt
        .block_on(c.release_vm(pb::ReleaseVmRequest {
            vm_id: "vm-a".into(),
        }))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(listed(&mut c, &rt), ["vm-a"]);
    let raised = conditions(&mut c, &rt);
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(
        raised[0].0,
        pb::ConditionType::CheckpointWriteFailing as i32
    );
    assert!(raised[0].1.contains("No space left"), "{raised:?}");
    assert_eq!(
        metric(
            &d,
            "sevplace_condition{condition=\"checkpoint_write_failing\"}"
        ),
        1.0
    );
    assert_eq!(metric(&d, "sevplace_checkpoint_write_failures_total"), 2.0);
    let host = d.ctl(&["host"]);
    assert!(
        String::from_utf8_lossy(&host.stdout).contains("condition   checkpoint_write_failing"),
        "{}",
        String::from_utf8_lossy(&host.stdout)
    );

    // Space again: the same call succeeds, the condition clears.
    std::fs::remove_file(&filler).unwrap();
    rt.block_on(c.place_vm(place("vm-b"))).expect("place vm-b");
    assert!(conditions(&mut c, &rt).is_empty());

    // Read-only.
    fs.remount("ro");
    let err = rt.block_on(c.place_vm(place("vm-c"))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("Read-only"), "{}", err.message());
    assert_eq!(
        conditions(&mut c, &rt)[0].0,
        pb::ConditionType::CheckpointWriteFailing as i32
    );
    assert_eq!(listed(&mut c, &rt), ["vm-a", "vm-b"]);
    fs.remount("rw");
    rt.block_on(c.place_vm(place("vm-c"))).expect("place vm-c");
    assert!(conditions(&mut c, &rt).is_empty());
    drop(c);

    // Every acknowledged intent survives kill -9.
    let dir = d.kill9();
    let d = Daemon::start_in(dir, &["--host-root", host_root], &[]);
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    assert_eq!(listed(&mut c, &rt), ["vm-a", "vm-b", "vm-c"]);
    drop(d);
    drop(fs);
}

/// A copy of the Genoa fixture with an empty /proc (a host without VMs),
/// to which a test can add /sys/kernel/sevflush.
fn host_root_copy() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", genoa().display()))
        .arg(root.path())
        .output()
        .expect("cp");
    assert!(out.status.success());
    std::fs::create_dir_all(root.path().join("proc")).unwrap();
    root
}

#[test]
fn module_unloading_and_loading_under_the_daemon() {
    use sevplace::kmod::fake_tree::{write_globals, write_record};
    let root = host_root_copy();
    let kernel = root.path().join("sys/kernel");
    let live = kernel.join("sevflush");
    write_globals(&live, "targeted", [3, 12, 1, 0, 0]).unwrap();
    write_record(&live, 1, 4242, "0-3", "0-7", 3, 12).unwrap();
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &["--host-root", root.path().to_str().unwrap()],
        &[("SEVPLACE__RECONCILE__PERIOD_MS", "100")],
    );
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    let module_state = |c: &mut Client| {
        rt.block_on(c.get_host(pb::GetHostRequest {}))
            .expect("GetHost keeps answering")
            .into_inner()
            .host
            .and_then(|h| h.module)
            .map(|m| (m.state, m.message))
            .expect("module status")
    };
    assert_eq!(module_state(&mut c).0, pb::ModuleState::Loaded as i32);
    rt.block_on(c.place_vm(place("vm-a"))).expect("place vm-a");

    // The module goes away and comes back at once (as kernfs removes and
    // adds a kobject directory) every few milliseconds, for 3 s, while
    // the reconcile loop (100 ms period) and the calls read it.
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (kernel, live, stop) = (kernel.clone(), live.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let gone = kernel.join(format!(".gone-{i}"));
                std::fs::rename(&live, &gone).unwrap();
                std::fs::remove_dir_all(&gone).unwrap();
                std::thread::sleep(Duration::from_millis(2));
                let stage = kernel.join(format!(".stage-{i}"));
                write_globals(&stage, "targeted", [3, 12, 1, 0, 0]).unwrap();
                write_record(&stage, 1, 4242, "0-3", "0-7", 3, 12).unwrap();
                std::fs::rename(&stage, &live).unwrap();
                std::thread::sleep(Duration::from_millis(3));
                i += 1;
            }
        })
    };
    let (mut loaded, mut absent) = (0, 0);
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let (state, message) = module_state(&mut c);
        match pb::ModuleState::try_from(state) {
            Ok(pb::ModuleState::Loaded) => loaded += 1,
            Ok(pb::ModuleState::Absent) => absent += 1,
            other => panic!("module state {other:?}: {message}"),
        }
        assert_eq!(listed(&mut c, &rt), ["vm-a"]);
    }
    stop.store(true, Ordering::Relaxed);
    toggler.join().unwrap();
    eprintln!("module toggled: {loaded} answers loaded, {absent} absent");
    assert!(loaded + absent > 0);
    assert_eq!(
        metric(&d, "sevplace_condition{condition=\"module_unusable\"}"),
        0.0,
        "an unload is absence, not an unusable module"
    );

    // Gone for good: absent; placements and calls unaffected.
    std::fs::remove_dir_all(&live).unwrap();
    assert!(wait_until(Duration::from_secs(5), || module_state(&mut c)
        .0
        == pb::ModuleState::Absent as i32));
    rt.block_on(c.place_vm(place("vm-b"))).expect("place vm-b");
    // Back with another ABI: reported, and the condition is raised.
    write_globals(&live, "targeted", [0; 5]).unwrap();
    std::fs::write(live.join("abi_version"), "99\n").unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        metric(&d, "sevplace_condition{condition=\"module_unusable\"}") == 1.0
    }));
    let (state, message) = module_state(&mut c);
    assert_eq!(state, pb::ModuleState::AbiMismatch as i32);
    assert!(message.contains("99"), "{message}");
    // Back with the right ABI: loaded, condition cleared.
    std::fs::write(live.join("abi_version"), "1\n").unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        metric(&d, "sevplace_condition{condition=\"module_unusable\"}") == 0.0
    }));
    assert_eq!(module_state(&mut c).0, pb::ModuleState::Loaded as i32);
    assert_eq!(listed(&mut c, &rt), ["vm-a", "vm-b"]);
}

/// A cgroup v1 cpuset tree made by the test; on drop every task left in it
/// goes back to the root cpuset and the directories are removed, deepest
/// first.
struct V1Tree {
    mount: PathBuf,
    dirs: Vec<PathBuf>,
}

impl V1Tree {
    fn mkdir(&mut self, dir: PathBuf, cpus: &str, mems: &str) -> std::io::Result<()> {
        std::fs::create_dir(&dir)?;
        self.dirs.push(dir.clone());
        std::fs::write(dir.join("cpuset.mems"), mems)?;
        if !cpus.is_empty() {
            std::fs::write(dir.join("cpuset.cpus"), cpus)?;
        }
        Ok(())
    }
}

impl V1Tree {
    /// Removes one directory made by `mkdir` (it must be empty).
    fn rmdir(&mut self, dir: &Path) {
        std::fs::remove_dir(dir).unwrap_or_else(|e| panic!("rmdir {}: {e}", dir.display()));
        self.dirs.retain(|d| d != dir);
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

fn write(path: &Path, value: &str) {
    std::fs::write(path, value)
        .unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()));
}

fn read_set(path: &Path) -> sevplace::CpuSet {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    sevplace::CpuSet::parse(text.trim()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A real kernel refusal under the daemon: a VM in libvirt's v1 cgroup
/// layout (`NAME.libvirt-qemu/vcpuN`) is placed, then its vCPU cgroups are
/// narrowed by hand and a sibling cpuset takes one of its CPUs with
/// `cpu_exclusive`, so the agent's write that puts a vCPU cgroup back
/// fails with EINVAL from the kernel (an exclusive sibling overlaps); then
/// a vCPU cgroup is widened and given a child on another CPU, so the write
/// back fails with EBUSY (a child would lose its CPU). The agent keeps the intent, reports
/// the VM drifted, raises pins_failing, retries with backoff, and puts the
/// placement back once the exclusive flag is cleared.
#[test]
fn real_v1_cpuset_refusal_is_reported_retried_and_healed() {
    let test = "real_v1_cpuset_refusal_is_reported_retried_and_healed";
    let mount = PathBuf::from("/sys/fs/cgroup/cpuset");
    if !nix::unistd::geteuid().is_root() {
        skip(test, "root", "not root");
        return;
    }
    if !mount.join("cpuset.cpus").is_file() {
        skip(
            test,
            "cgroup-v1-cpuset",
            format_args!("no cgroup v1 cpuset hierarchy at {}", mount.display()),
        );
        return;
    }
    let online = read_set(&mount.join("cpuset.effective_cpus"));
    if online.len() < 2 {
        skip(
            test,
            "two-cpus",
            format_args!("needs two CPUs in the root cpuset, has {online}"),
        );
        return;
    }
    let mems = std::fs::read_to_string(mount.join("cpuset.effective_mems")).unwrap();
    let mems = mems.trim();
    let mut tree = V1Tree {
        mount: mount.clone(),
        dirs: Vec::new(),
    };
    let top = mount.join(format!("sevplace-fault-{}", std::process::id()));
    tree.mkdir(top.clone(), &online.to_string(), mems).unwrap();
    if let Err(e) = std::fs::write(top.join("cpuset.cpu_exclusive"), "1") {
        skip(
            test,
            "exclusive-cpuset",
            format_args!("a test cpuset cannot be exclusive next to this host's cpusets: {e}"),
        );
        return;
    }
    let machine = top.join("qemu-1-cgfault.libvirt-qemu");
    tree.mkdir(machine.clone(), &online.to_string(), mems)
        .unwrap();
    // An exclusive child needs an exclusive parent.
    write(&machine.join("cpuset.cpu_exclusive"), "1");
    for child in ["vcpu0", "vcpu1", "emulator"] {
        tree.mkdir(machine.join(child), &online.to_string(), mems)
            .unwrap();
    }
    let excl = machine.join("excl");
    tree.mkdir(excl.clone(), "", mems).unwrap();

    let Some(vm) = GuestVm::start(
        test,
        &["--vcpus", "2", "-name", "guest=cgfault,debug-threads=on"],
    ) else {
        return;
    };
    for (tid, comm) in vm.threads() {
        let group = match comm
            .strip_prefix("CPU ")
            .and_then(|r| r.strip_suffix("/KVM"))
        {
            Some(i) => format!("vcpu{i}"),
            None => "emulator".to_string(),
        };
        write(&machine.join(&group).join("tasks"), &tid.to_string());
    }
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &[],
        &[("SEVPLACE__RECONCILE__PERIOD_MS", "200")],
    );
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    let get = |c: &mut Client| {
        rt.block_on(c.get_vm(pb::GetVmRequest {
            vm_id: "vm-cg".into(),
        }))
        .expect("GetVm keeps answering")
        .into_inner()
        .vm
        .expect("vm")
    };
    assert!(wait_until(Duration::from_secs(10), || {
        rt.block_on(c.list_vms(pb::ListVmsRequest::default()))
            .is_ok_and(|r| r.into_inner().vms.iter().any(|v| v.pid == vm.pid))
    }));
    rt.block_on(c.place_vm(pb::PlaceVmRequest {
        vm_id: "vm-cg".into(),
        vcpus: 2,
        confidential_class: pb::ConfidentialClass::None as i32,
        selector: Some(pb::VmSelector {
            selector: Some(pb::vm_selector::Selector::Pid(vm.pid)),
        }),
        ..Default::default()
    }))
    .expect("place vm-cg");
    let placement = get(&mut c).placement.expect("placement");
    let sets: Vec<sevplace::CpuSet> = placement
        .vcpus
        .iter()
        .map(|v| v.cpus.iter().copied().collect())
        .collect();
    assert_eq!(sets.len(), 2);
    for (i, set) in sets.iter().enumerate() {
        assert_eq!(
            &read_set(&machine.join(format!("vcpu{i}/cpuset.cpus"))),
            set
        );
    }

    // The fault: one placed CPU taken by an exclusive sibling of the vCPU
    // cgroups.
    let union = sets[0].union(&sets[1]);
    let taken = union.iter().last().expect("a placed CPU");
    let rest = online.difference(&sevplace::CpuSet::range(taken, taken));
    let fallback = rest.first().expect("another CPU").to_string();
    for child in ["vcpu0", "vcpu1", "emulator"] {
        let file = machine.join(child).join("cpuset.cpus");
        let narrowed = read_set(&file).intersection(&rest);
        let value = if narrowed.is_empty() {
            fallback.clone()
        } else {
            narrowed.to_string()
        };
        write(&file, &value);
    }
    write(&excl.join("cpuset.cpus"), &taken.to_string());
    write(&excl.join("cpuset.cpu_exclusive"), "1");

    assert!(
        wait_until(Duration::from_secs(20), || {
            metric(&d, "sevplace_condition{condition=\"pins_failing\"}") == 1.0
        }),
        "the refused write did not raise pins_failing"
    );
    let raised = conditions(&mut c, &rt);
    assert!(
        raised
            .iter()
            .any(|(t, m)| *t == pb::ConditionType::PinsFailing as i32 && m.contains("vm-cg")),
        "{raised:?}"
    );
    let failures = metric(&d, "sevplace_pin_failures_total{reason=\"invalid_set\"}");
    assert!(failures > 0.0, "{failures}");
    let v = get(&mut c);
    assert_eq!(v.state, pb::VmState::Drifted as i32);
    assert_eq!(v.placement.expect("intent kept").vcpus.len(), 2);

    // Healed: the retry widens the VM's cgroup and restores every vCPU.
    write(&excl.join("cpuset.cpu_exclusive"), "0");
    assert!(
        wait_until(Duration::from_secs(30), || get(&mut c).state
            == pb::VmState::Placed as i32),
        "not placed again after the fault was cleared"
    );
    for (i, set) in sets.iter().enumerate() {
        assert_eq!(
            &read_set(&machine.join(format!("vcpu{i}/cpuset.cpus"))),
            set
        );
        assert_eq!(
            &sevplace_tests::cpus_allowed(vm.pid, vm.vcpu_tid(u32::try_from(i).unwrap())),
            set
        );
    }
    assert!(wait_until(Duration::from_secs(5), || {
        metric(&d, "sevplace_condition{condition=\"pins_failing\"}") == 0.0
    }));

    // EBUSY: vCPU 1's cgroup widened by hand and given a child cpuset on a
    // CPU outside vCPU 1's placement, and the thread moved; writing the
    // placement back would take that CPU from the child, which the kernel
    // refuses with EBUSY.
    let vcpu1 = machine.join("vcpu1");
    match online.difference(&sets[1]).first() {
        None => eprintln!("note: vCPU 1 is placed on every CPU; no EBUSY case here"),
        Some(other) => {
            write(&vcpu1.join("cpuset.cpus"), &online.to_string());
            let child = vcpu1.join("held");
            tree.mkdir(child.clone(), &other.to_string(), mems).unwrap();
            // Since Linux 6.2 a cpuset change keeps the affinity a thread
            // asked for; move the thread too, as a hand-made drift does.
            let out = std::process::Command::new("taskset")
                .args(["-p", "-c", &online.to_string(), &vm.vcpu_tid(1).to_string()])
                .output()
                .expect("taskset");
            assert!(out.status.success());
            assert!(
                wait_until(Duration::from_secs(20), || {
                    metric_value(
                        &d.metrics_addr,
                        "sevplace_pin_failures_total{reason=\"busy\"}",
                    )
                    .is_some()
                }),
                "the refused write (EBUSY) was not counted"
            );
            assert_eq!(get(&mut c).state, pb::VmState::Drifted as i32);
            assert!(conditions(&mut c, &rt)
                .iter()
                .any(|(t, _)| *t == pb::ConditionType::PinsFailing as i32));
            tree.rmdir(&child);
            assert!(
                wait_until(Duration::from_secs(30), || get(&mut c).state
                    == pb::VmState::Placed as i32),
                "not placed again after the child cpuset was removed"
            );
            assert_eq!(read_set(&vcpu1.join("cpuset.cpus")), sets[1]);
        }
    }
    drop(c);
    drop(d);
    drop(vm);
    drop(tree);
}
