//! Discovery at scale: a fake procfs with 500 VMs x 16 vCPUs (plus 1000
//! ordinary processes). The timed run is `#[ignore]`d; run it with
//! `cargo test --release -p sevplace-agent --test discovery_scale -- --ignored --nocapture`.
//! The small run checks correctness of the same tree shape on every test run.

use std::time::Instant;

use sevplace::discovery::fake_procfs::{write_process, FakeProcess};
use sevplace::discovery::VmScanner;
use sevplace::ConfidentialClass;

fn build(root: &std::path::Path, vms: u32, vcpus: u32, plain: u32) {
    for i in 0..vms {
        let pid = 10_000 + i * 100;
        let name = format!("guest=vm{i},debug-threads=on");
        let mut p = FakeProcess::qemu_vm(
            pid,
            vcpus,
            &[
                "/usr/bin/qemu-system-x86_64",
                "-name",
                &name,
                "-object",
                "sev-guest,id=sev0,policy=0x1",
                "-machine",
                "q35,confidential-guest-support=sev0",
            ],
        );
        p.cgroup =
            format!("0::/machine.slice/machine-qemu\\x2d{i}\\x2dvm{i}.scope/libvirt/emulator\n");
        write_process(root, &p).expect("write fake VM");
    }
    for j in 0..plain {
        write_process(root, &FakeProcess::plain(200 + j, "worker")).expect("write fake process");
    }
}

#[test]
fn scan_shape_small() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 5, 16, 10);
    let vms = VmScanner::new(dir.path()).scan().unwrap();
    assert_eq!(vms.len(), 5);
    for v in &vms {
        assert_eq!(v.vcpus.len(), 16);
        assert_eq!(v.class, Some(ConfidentialClass::Sev));
        assert!(v.libvirt_domain.is_some());
    }
}

#[test]
#[ignore = "timing run; see the module documentation"]
fn scan_500_vms_x_16_vcpus() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    build(dir.path(), 500, 16, 1000);
    println!("built fake procfs in {:?}", t.elapsed());
    let scanner = VmScanner::new(dir.path());
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let vms = scanner.scan().unwrap();
        times.push(t.elapsed());
        assert_eq!(vms.len(), 500);
        assert!(vms.iter().all(|v| v.vcpus.len() == 16));
    }
    times.sort();
    println!(
        "scan of 500 VMs x 16 vCPUs + 1000 other processes: min {:?}, median {:?}, max {:?}",
        times[0], times[2], times[4]
    );
}
