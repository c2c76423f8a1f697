//! Auto mode: a discovered confidential VM is placed without an
//! orchestrator call, shown by `sevplacectl top`, and released as soon as
//! it exits (pidfd). In its own test binary, so no other test's VM is
//! auto-placed.

use std::time::Duration;

use sevplace_tests::{cpus_allowed, wait_until, Daemon, GuestVm};

#[test]
fn auto_mode_places_confidential_vms() {
    let Some(vm) = GuestVm::start(
        "auto_mode_places_confidential_vms",
        &[
            "--vcpus",
            "2",
            "-object",
            "sev-snp-guest,id=snp0,policy=0x30000",
            "-machine",
            "q35,confidential-guest-support=snp0",
        ],
    ) else {
        return;
    };
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &[],
        &[
            ("SEVPLACE__RECONCILE__PERIOD_MS", "300"),
            ("SEVPLACE__RECONCILE__AUTO_PLACE_CONFIDENTIAL", "true"),
        ],
    );
    let id = format!("pid-{}", vm.pid);
    let mut placed = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(15), || {
            let out = d.ctl(&["--json", "vm", &id]);
            if !out.status.success() {
                return false;
            }
            placed = serde_json::from_slice(&out.stdout).unwrap();
            placed["vm"]["state"] == "VM_STATE_PLACED"
        }),
        "{placed}"
    );
    assert_eq!(
        placed["vm"]["confidentialClass"],
        "CONFIDENTIAL_CLASS_SEV_SNP"
    );
    for v in placed["vm"]["placement"]["vcpus"].as_array().unwrap() {
        let want: sevplace::CpuSet = v["cpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| u32::try_from(c.as_u64().unwrap()).unwrap())
            .collect();
        let tid = vm.vcpu_tid(u32::try_from(v["index"].as_u64().unwrap()).unwrap());
        assert_eq!(cpus_allowed(vm.pid, tid), want);
    }

    // top: two refreshes as JSON lines, the VM in both.
    let out = d.ctl(&["--json", "top", "--iterations", "2", "--interval", "0.2"]);
    assert!(out.status.success());
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2);
    for l in lines {
        let rows: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(
            rows.as_array()
                .unwrap()
                .iter()
                .any(|r| r["vmId"] == id.as_str()),
            "{l}"
        );
    }
    assert_eq!(d.ctl(&["top", "--interval", "0"]).status.code(), Some(2));

    // Exit: released well within one second of the pidfd firing, long
    // before a period of a slow loop would matter.
    drop(vm);
    assert!(wait_until(Duration::from_secs(5), || d
        .ctl(&["vm", &id])
        .status
        .code()
        == Some(1)));
}
