//! The real daemon acting on real KVM VMs (`kvm-guest-fixture`, real
//! /dev/kvm): discovery and classification, PlaceVm pinning read back from
//! /proc, drift put back within a period and reported on WatchEvents, exit
//! releasing the placement, and kill -9 during a burst of PlaceVm calls
//! and during group commits of 64 concurrent clients.

use std::process::Command;
use std::time::Duration;

use sevplace_proto::v1 as pb;
use sevplace_tests::{cpus_allowed, last_cpu, wait_until, Daemon, GuestVm};

const SEV_ARGS: &[&str] = &[
    "--vcpus",
    "2",
    "-name",
    "guest=e2e,debug-threads=on",
    "-object",
    "sev-guest,id=sev0,policy=0x5",
    "-machine",
    "q35,confidential-guest-support=sev0",
];

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "sevplacectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn vcpu_sets(vm: &serde_json::Value) -> Vec<sevplace::CpuSet> {
    vm["placement"]["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .map(|v| cpu_ids(&v["cpus"]).into_iter().collect())
        .collect()
}

/// The daemon on the genoa-2x96-nps1 fixture host (room for every VM of the
/// kill -9 bursts), its state and socket in `dir`.
fn start_on_fixture_host(dir: tempfile::TempDir) -> Daemon {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/genoa-2x96-nps1");
    let root = root.to_str().unwrap().to_string();
    Daemon::start_in(dir, &["--host-root", &root], &[])
}

/// The CPUs of the placement in a PlaceVm answer (none when it has no
/// placement).
fn placed_cpus(resp: tonic::Response<pb::PlaceVmResponse>) -> Vec<u32> {
    resp.into_inner()
        .vm
        .and_then(|v| v.placement)
        .map(|p| p.cpus)
        .unwrap_or_default()
}

/// The CPU ids of a JSON array of numbers (a `cpus` field of sevplacectl's
/// `--json` output).
fn cpu_ids(cpus: &serde_json::Value) -> Vec<u32> {
    cpus.as_array()
        .expect("cpus")
        .iter()
        .map(|c| u32::try_from(c.as_u64().expect("cpu")).expect("a u32 CPU id"))
        .collect()
}

#[test]
fn place_pin_drift_exit() {
    let Some(vm) = GuestVm::start("place_pin_drift_exit", SEV_ARGS) else {
        return;
    };
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &[],
        &[("SEVPLACE__RECONCILE__PERIOD_MS", "200")],
    );
    let pid = vm.pid.to_string();

    // Discovered and classified before any placement.
    assert!(wait_until(Duration::from_secs(10), || {
        let v = json(&d.ctl(&["--json", "vms"]));
        v["vms"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["pid"] == vm.pid
                    && x["state"] == "VM_STATE_UNMANAGED"
                    && x["confidentialClass"] == "CONFIDENTIAL_CLASS_SEV_ES"
            })
        })
    }));

    let placed = json(&d.ctl(&["--json", "place", "vm-e2e", "--pid", &pid, "--vcpus", "2"]));
    let vmj = &placed["vm"];
    assert_eq!(vmj["state"], "VM_STATE_PLACED", "{vmj}");
    assert_eq!(vmj["classSource"], "CLASS_SOURCE_COMMAND_LINE");
    let sets = vcpu_sets(vmj);
    assert_eq!(sets.len(), 2);
    for (i, set) in sets.iter().enumerate() {
        let tid = vm.vcpu_tid(u32::try_from(i).unwrap());
        assert_eq!(&cpus_allowed(vm.pid, tid), set, "vCPU {i}");
        // A thread asleep when its affinity changed keeps its last CPU
        // until it next runs (the fixture's vCPUs exit to the host once a
        // second); from its first run on, it runs inside its set.
        assert!(
            wait_until(Duration::from_secs(5), || {
                last_cpu(vm.pid, tid).is_some_and(|c| set.contains(c))
            }),
            "vCPU {i} did not run inside {set} within 5 s (last CPU {:?})",
            last_cpu(vm.pid, tid)
        );
        for _ in 0..10 {
            if let Some(c) = last_cpu(vm.pid, tid) {
                assert!(set.contains(c), "vCPU {i} ran on {c}, outside {set}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // Drift: move vCPU 0 by hand with taskset; the agent puts it back and
    // says so on WatchEvents.
    let rt = sevplace_tests::runtime();
    let mut stream = rt.block_on(async {
        let mut c = sevplace::client::connect(&d.socket).await.unwrap();
        c.watch_events(pb::WatchEventsRequest {
            vm_id: "vm-e2e".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    let tid0 = vm.vcpu_tid(0);
    let online = sevplace::topology::Topology::from_sysfs(std::path::Path::new("/sys"))
        .unwrap()
        .online;
    let status = Command::new("taskset")
        .args(["-p", "-c", &online.to_string(), &tid0.to_string()])
        .output()
        .expect("taskset");
    assert!(status.status.success());
    if online != sets[0] {
        let drift = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let ev = stream.message().await.unwrap().unwrap();
                    if let Some(pb::event::Kind::Drift(d)) = ev.event.and_then(|e| e.kind) {
                        return d;
                    }
                }
            })
            .await
            .expect("a drift event within 10 s")
        });
        assert_eq!(drift.reason, "thread_moved");
        assert_eq!(drift.tid, tid0);
        assert_eq!(drift.enforced_cpus, sets[0].to_vec());
    }
    assert!(wait_until(Duration::from_secs(5), || cpus_allowed(
        vm.pid, tid0
    ) == sets[0]));

    // The VM exits: its placement is released within a period.
    drop(vm);
    assert!(wait_until(Duration::from_secs(10), || {
        d.ctl(&["vm", "vm-e2e"]).status.code() == Some(1)
    }));
    let host = json(&d.ctl(&["--json", "host"]));
    assert_eq!(
        host["host"]["confidentialPoolL3Domains"],
        serde_json::json!([])
    );
}

#[test]
fn kill9_during_place_burst_keeps_every_acknowledged_placement() {
    let d = start_on_fixture_host(tempfile::tempdir().unwrap());
    let socket = d.socket.clone();
    // A burst of PlaceVm for VMs that are not running yet (PENDING), from
    // several threads; the daemon is killed in the middle of it.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<u32>)>::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let socket = socket.clone();
        let acked = acked.clone();
        workers.push(std::thread::spawn(move || {
            let rt = sevplace_tests::runtime();
            rt.block_on(async {
                let Ok(mut c) = sevplace::client::connect(&socket).await else {
                    return;
                };
                for i in 0..40 {
                    let id = format!("burst-{w}-{i}");
                    let class = if i % 3 == 0 {
                        pb::ConfidentialClass::None
                    } else {
                        pb::ConfidentialClass::Sev
                    };
                    let r = c
                        .place_vm(pb::PlaceVmRequest {
                            vm_id: id.clone(),
                            vcpus: 1 + (i % 4),
                            confidential_class: class as i32,
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(resp) => {
                            let cpus = placed_cpus(resp);
                            acked.lock().unwrap().push((id, cpus));
                        }
                        Err(_) => return,
                    }
                }
            });
        }));
    }
    assert!(wait_until(Duration::from_secs(30), || acked
        .lock()
        .unwrap()
        .len()
        >= 20));
    let dir = d.kill9();
    for w in workers {
        let _ = w.join();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());

    let d = start_on_fixture_host(dir);
    let listed = json(&d.ctl(&["--json", "vms"]));
    let vms = listed["vms"].as_array().unwrap();
    let mut seen = sevplace::CpuSet::new();
    for v in vms {
        let cpus = cpu_ids(&v["placement"]["cpus"]);
        for c in &cpus {
            assert!(seen.insert(*c), "CPU {c} given twice");
        }
    }
    for (id, cpus) in &acked {
        let v = vms
            .iter()
            .find(|v| v["vmId"] == id.as_str())
            .unwrap_or_else(|| panic!("acknowledged {id} lost"));
        let got = cpu_ids(&v["placement"]["cpus"]);
        assert_eq!(&got, cpus, "{id} changed across the restart");
        assert_eq!(v["state"], "VM_STATE_PENDING");
    }
    // Identical retry after restart: same answer.
    let (id, cpus) = &acked[0];
    let vcpus = vms.iter().find(|v| v["vmId"] == id.as_str()).unwrap()["vcpus"]
        .as_u64()
        .unwrap()
        .to_string();
    let class = if vms.iter().find(|v| v["vmId"] == id.as_str()).unwrap()["confidentialClass"]
        == "CONFIDENTIAL_CLASS_NONE"
    {
        "none"
    } else {
        "sev"
    };
    let again = json(&d.ctl(&[
        "--json",
        "place",
        id,
        "--vcpus",
        &vcpus,
        "--confidential",
        class,
    ]));
    let got = cpu_ids(&again["vm"]["placement"]["cpus"]);
    assert_eq!(&got, cpus);
}

/// The CPUs of every VM the daemon lists, by id.
fn listed_cpus(d: &Daemon) -> std::collections::BTreeMap<String, Vec<u32>> {
    let listed = json(&d.ctl(&["--json", "vms"]));
    listed["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let cpus = cpu_ids(&v["placement"]["cpus"]);
            (v["vmId"].as_str().unwrap().to_string(), cpus)
        })
        .collect()
}

/// 64 clients, one connection each, place and release VMs at once, so
/// group commits (one write covering many decisions) are in flight when the
/// daemon is killed with SIGKILL. After the restart every acknowledged
/// placement is there with its CPUs, every acknowledged release is gone,
/// no CPU is held by two VMs, and an identical retry gets the same CPUs.
#[test]
fn kill9_during_group_commits_of_64_clients_loses_no_acknowledged_call() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let d = start_on_fixture_host(tempfile::tempdir().unwrap());
    let placed = Arc::new(Mutex::new(Vec::<(String, Vec<u32>)>::new()));
    let released = Arc::new(Mutex::new(Vec::<String>::new()));
    // Releases sent, acknowledged or not: an unanswered one may be durable.
    let releasing = Arc::new(Mutex::new(Vec::<String>::new()));
    let acks = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut clients = Vec::new();
    for client in 0..64 {
        let (socket, placed, released, releasing, acks) = (
            d.socket.clone(),
            placed.clone(),
            released.clone(),
            releasing.clone(),
            acks.clone(),
        );
        clients.push(rt.spawn(async move {
            let Ok(mut c) = sevplace::client::connect(&socket).await else {
                return;
            };
            // Place gc-<client>-<i>; after each odd i release the one
            // before, so releases are in the groups too.
            for i in 0..10 {
                let id = format!("gc-{client}-{i}");
                let r = c
                    .place_vm(pb::PlaceVmRequest {
                        vm_id: id.clone(),
                        vcpus: 1,
                        confidential_class: pb::ConfidentialClass::None as i32,
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(resp) => {
                        let cpus = placed_cpus(resp);
                        placed.lock().unwrap().push((id, cpus));
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    // The host is full: refused, not acknowledged.
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {}
                    Err(_) => return,
                }
                if i % 2 == 1 {
                    let before = format!("gc-{client}-{}", i - 1);
                    releasing.lock().unwrap().push(before.clone());
                    match c
                        .release_vm(pb::ReleaseVmRequest {
                            vm_id: before.clone(),
                        })
                        .await
                    {
                        Ok(_) => {
                            released.lock().unwrap().push(before);
                            acks.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(s) if s.code() == tonic::Code::NotFound => {}
                        Err(_) => return,
                    }
                }
            }
        }));
    }
    assert!(
        wait_until(Duration::from_secs(60), || acks.load(Ordering::SeqCst)
            >= 128),
        "the clients made no progress"
    );
    let dir = d.kill9();
    rt.block_on(async {
        for c in clients {
            let _ = c.await;
        }
    });
    let placed = placed.lock().unwrap().clone();
    let released = released.lock().unwrap().clone();
    let releasing = releasing.lock().unwrap().clone();
    assert!(!placed.is_empty());

    let d = start_on_fixture_host(dir);
    let listed = listed_cpus(&d);
    let mut seen = sevplace::CpuSet::new();
    for (id, cpus) in &listed {
        for c in cpus {
            assert!(seen.insert(*c), "CPU {c} given twice ({id})");
        }
    }
    for id in &released {
        assert!(
            !listed.contains_key(id),
            "acknowledged release of {id} lost"
        );
    }
    for (id, cpus) in placed.iter().filter(|(id, _)| !releasing.contains(id)) {
        let got = listed
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged placement of {id} lost"));
        assert_eq!(got, cpus, "{id} changed across the restart");
    }
    let (id, cpus) = placed
        .iter()
        .find(|(id, _)| !releasing.contains(id))
        .expect("a placement that was not released");
    let again = json(&d.ctl(&[
        "--json",
        "place",
        id,
        "--vcpus",
        "1",
        "--confidential",
        "none",
    ]));
    let got = cpu_ids(&again["vm"]["placement"]["cpus"]);
    assert_eq!(&got, cpus, "an identical retry after the restart");
}

#[test]
fn validate_only_and_invalid_requests() {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/milan-64c");
    let d = Daemon::start(&["--host-root", root.to_str().unwrap()]);
    let v = json(&d.ctl(&[
        "--json",
        "place",
        "dry",
        "--vcpus",
        "8",
        "--confidential",
        "sev-snp",
        "--validate-only",
    ]));
    assert_eq!(v["validatedOnly"], true);
    let cpus = v["vm"]["placement"]["cpus"].as_array().unwrap().len();
    assert_eq!(cpus, 8);
    assert_eq!(
        v["vm"]["placement"]["l3Domains"].as_array().unwrap().len(),
        1
    );
    // Nothing changed.
    assert_eq!(
        json(&d.ctl(&["--json", "vms"]))["vms"],
        serde_json::json!([])
    );
    let text = String::from_utf8(
        d.ctl(&[
            "place",
            "dry",
            "--vcpus",
            "4",
            "--confidential",
            "sev",
            "--validate-only",
        ])
        .stdout,
    )
    .unwrap();
    assert!(
        text.contains("validate only") && text.contains("cpus"),
        "{text}"
    );

    for (args, field) in [
        (
            vec!["place", "bad/id", "--vcpus", "1", "--confidential", "sev"],
            "vm_id",
        ),
        (
            vec!["place", "x", "--vcpus", "0", "--confidential", "sev"],
            "vcpus",
        ),
        (vec!["place", "x", "--vcpus", "2"], "confidential_class"),
        (
            vec![
                "place",
                "x",
                "--pid",
                "0",
                "--vcpus",
                "1",
                "--confidential",
                "sev",
            ],
            "selector.pid",
        ),
    ] {
        let out = d.ctl(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("InvalidArgument") && err.contains(field),
            "{args:?}: {err}"
        );
    }
    let out = d.ctl(&["place", "huge", "--vcpus", "1000", "--confidential", "sev"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ResourceExhausted") || err.contains("InvalidArgument"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&d.ctl(&["release", "nope"]).stderr).contains("NotFound"));
}
