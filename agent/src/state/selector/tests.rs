use super::*;
use crate::discovery::fake_procfs::{write_process, FakeProcess};
use crate::discovery::VmScanner;
use std::collections::BTreeMap;

/// A VM read back by the real scanner from a fake procfs entry.
fn vm(pid: u32, cmdline: &[&str], cgroup: &str) -> DiscoveredVm {
    let dir = tempfile::tempdir().unwrap();
    let mut p = FakeProcess::qemu_vm(pid, 1, cmdline);
    p.cgroup = cgroup.into();
    write_process(dir.path(), &p).unwrap();
    VmScanner::new(dir.path()).inspect(pid).unwrap()
}

fn cg(path: &str) -> VmSelector {
    VmSelector::CgroupPath { path: path.into() }
}

fn domain(name: &str) -> VmSelector {
    VmSelector::LibvirtDomain { name: name.into() }
}

fn pids(r: &Resolution) -> Vec<u32> {
    match r {
        Resolution::None | Resolution::Invalid(_) => Vec::new(),
        Resolution::One(v) => vec![v.pid],
        Resolution::Ambiguous(v) | Resolution::Ancestor(v) => v.iter().map(|v| v.pid).collect(),
    }
}

const WEB: &str = "0::/machine.slice/machine-qemu\\x2d3\\x2dweb.scope/libvirt/emulator\n";
const DB: &str = "0::/machine.slice/machine-qemu\\x2d4\\x2ddb.scope/libvirt/emulator\n";

#[test]
fn one_vm_by_each_kind_of_selector() {
    let web = vm(77, &["qemu-system-x86_64", "-name", "guest=web"], WEB);
    let db = vm(78, &["qemu-system-x86_64", "-name", "guest=db"], DB);
    let all = [&web, &db];
    let yes = [
        VmSelector::Process {
            pid: 77,
            start_time: None,
        },
        VmSelector::Process {
            pid: 77,
            start_time: Some(web.start_time),
        },
        domain("web"),
        cg("/machine.slice/machine-qemu\\x2d3\\x2dweb.scope"),
        cg("/machine.slice/machine-qemu\\x2d3\\x2dweb.scope/"),
        cg("/machine.slice/machine-qemu\\x2d3\\x2dweb.scope/libvirt/emulator"),
        cg("/machine.slice/machine-qemu\\x2d3\\x2dweb.scope/libvirt/vcpu0"),
    ];
    for s in &yes {
        assert_eq!(resolve(s, all), Resolution::One(&web), "{s:?}");
    }
    let no = [
        VmSelector::Process {
            pid: 79,
            start_time: None,
        },
        VmSelector::Process {
            pid: 77,
            start_time: Some(web.start_time + 1),
        },
        domain("we"),
        cg("/machine.slice/machine-qemu\\x2d3\\x2dweb.sc"),
        cg("/user.slice"),
    ];
    for s in &no {
        assert_eq!(resolve(s, all), Resolution::None, "{s:?}");
    }
}

#[test]
fn a_parent_cgroup_of_several_vms_names_none_and_says_which() {
    let web = vm(77, &["qemu-system-x86_64", "-name", "guest=web"], WEB);
    let db = vm(78, &["qemu-system-x86_64", "-name", "guest=db"], DB);
    for parent in ["/machine.slice", "/machine.slice/"] {
        let r = resolve(&cg(parent), [&web, &db]);
        assert!(matches!(r, Resolution::Ancestor(_)), "{r:?}");
        assert_eq!(pids(&r), [77, 78]);
        let msg = r.problem(&cg(parent)).unwrap();
        assert!(msg.contains("pid 77") && msg.contains("pid 78"), "{msg}");
        assert!(msg.contains("libvirt domain web"), "{msg}");
    }
    // Above a single VM it is refused as well: the next VM started there
    // would change what it names.
    let r = resolve(&cg("/machine.slice"), [&web]);
    assert_eq!(pids(&r), [77]);
    assert!(matches!(r, Resolution::Ancestor(_)));
}

#[test]
fn root_and_empty_paths_are_invalid() {
    let web = vm(77, &["qemu-system-x86_64", "-name", "guest=web"], WEB);
    for p in ["/", "//", "", "machine.slice", "/machine.slice/../x"] {
        let e = validate(&cg(p)).unwrap_err();
        assert_eq!(e.field, "selector.cgroup_path", "{p:?}");
        assert!(matches!(resolve(&cg(p), [&web]), Resolution::Invalid(_)));
    }
    assert_eq!(
        validate(&domain("")).unwrap_err().field,
        "selector.libvirt_domain"
    );
    assert!(validate(&cg("/machine.slice")).is_ok());
}

#[test]
fn a_shared_process_cgroup_is_ambiguous_and_the_root_cgroup_is_nobodys() {
    // Two plain QEMU processes (no libvirt) in one session scope.
    let scope = "0::/user.slice/user-0.slice/session-1.scope\n";
    let a = vm(80, &["qemu-system-x86_64", "-name", "guest=a"], scope);
    let b = vm(81, &["qemu-system-x86_64", "-name", "guest=b"], scope);
    let s = cg("/user.slice/user-0.slice/session-1.scope");
    let r = resolve(&s, [&a, &b]);
    assert!(matches!(r, Resolution::Ambiguous(_)), "{r:?}");
    assert_eq!(pids(&r), [80, 81]);
    assert!(r.problem(&s).unwrap().contains("matches 2 VMs"));
    // VMs in the root cgroup have no own cgroup: no path names them.
    let c = vm(82, &["qemu-system-x86_64"], "0::/\n");
    assert_eq!(resolve(&cg("/user.slice"), [&c]), Resolution::None);
}

#[test]
fn libvirt_domain_wins_over_a_guest_name_and_equal_guest_names_are_ambiguous() {
    // A libvirt domain "web" and a hand-started QEMU with -name guest=web.
    let libvirt = vm(77, &["qemu-system-x86_64", "-name", "guest=web"], WEB);
    let plain = vm(
        90,
        &["qemu-system-x86_64", "-name", "guest=web"],
        "0::/user.slice\n",
    );
    assert!(libvirt.libvirt_domain.is_some() && plain.libvirt_domain.is_none());
    assert_eq!(
        resolve(&domain("web"), [&plain, &libvirt]),
        Resolution::One(&libvirt)
    );
    // Without the libvirt domain the guest name is used.
    assert_eq!(resolve(&domain("web"), [&plain]), Resolution::One(&plain));
    // Two plain QEMUs with one guest name: ambiguous, naming both.
    let twin = vm(
        91,
        &["qemu-system-x86_64", "-name", "guest=web"],
        "0::/user.slice\n",
    );
    let r = resolve(&domain("web"), [&twin, &plain]);
    assert_eq!(pids(&r), [90, 91]);
    assert!(matches!(r, Resolution::Ambiguous(_)));
    let msg = r.problem(&domain("web")).unwrap();
    assert!(msg.contains("guest name web"), "{msg}");
    // A guest name of a libvirt domain called otherwise does not count.
    let renamed = vm(
        92,
        &["qemu-system-x86_64", "-name", "guest=web"],
        "0::/machine.slice/machine-qemu\\x2d5\\x2dother.scope/libvirt/emulator\n",
    );
    assert_eq!(renamed.libvirt_domain.as_deref(), Some("other"));
    assert_eq!(resolve(&domain("web"), [&renamed]), Resolution::None);
}

/// The index answers what the full scan answers, for every kind of
/// selector over VMs with and without libvirt domains, shared guest names
/// and shared cgroups.
#[test]
fn the_scan_index_answers_as_the_full_scan() {
    let vms = [
        vm(77, &["qemu-system-x86_64", "-name", "guest=web"], WEB),
        vm(78, &["qemu-system-x86_64", "-name", "guest=db"], DB),
        vm(
            79,
            &["qemu-system-x86_64", "-name", "guest=web"],
            "0::/user.slice/a.scope\n",
        ),
        vm(
            80,
            &["qemu-system-x86_64", "-name", "guest=solo"],
            "0::/user.slice/a.scope\n",
        ),
        vm(
            81,
            &["qemu-system-x86_64", "-name", "guest=twin"],
            "0::/user.slice/b.scope\n",
        ),
        vm(
            82,
            &["qemu-system-x86_64", "-name", "guest=twin"],
            "0::/user.slice/c.scope\n",
        ),
        vm(83, &["qemu-system-x86_64"], "0::/\n"),
    ];
    let scan: BTreeMap<u32, DiscoveredVm> = vms.iter().map(|v| (v.pid, v.clone())).collect();
    let index = ScanIndex::new(&scan);
    let mut selectors = vec![
        domain("web"),
        domain("db"),
        domain("solo"),
        domain("twin"),
        domain("nobody"),
        domain(""),
        cg("/"),
        cg("/machine.slice"),
        cg("/user.slice/a.scope"),
        cg("/user.slice/b.scope"),
        cg(""),
    ];
    for v in &vms {
        selectors.push(VmSelector::Process {
            pid: v.pid,
            start_time: None,
        });
        selectors.push(VmSelector::Process {
            pid: v.pid,
            start_time: Some(v.start_time),
        });
        selectors.push(VmSelector::Process {
            pid: v.pid,
            start_time: Some(v.start_time + 1),
        });
    }
    selectors.push(VmSelector::Process {
        pid: 0,
        start_time: None,
    });
    selectors.push(VmSelector::Process {
        pid: 99,
        start_time: None,
    });
    for s in &selectors {
        assert_eq!(index.resolve(s), resolve(s, scan.values()), "{s:?}");
    }
}
