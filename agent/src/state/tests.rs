use super::*;

fn intent(id: &str, pid: u32) -> IntentRecord {
    IntentRecord {
        vm_id: VmId::new(id).unwrap(),
        selector: VmSelector::Process {
            pid,
            start_time: Some(12345),
        },
        request: PlacementRequest {
            vcpus: 2,
            class: Some(ConfidentialClass::SevEs),
            dedicated: true,
            numa_node: None,
        },
        placement: Some(PlacementRecord {
            class: ConfidentialClass::SevEs,
            cpus: CpuSet::range(0, 1),
            vcpu_cpus: vec![CpuSet::range(0, 0), CpuSet::range(1, 1)],
            emulator_cpus: Some(CpuSet::range(2, 3)),
            l3_groups: vec![CpuSet::range(0, 1)],
            numa_nodes: vec![0],
            shares_confidential_domain: false,
        }),
    }
}

fn sample() -> Checkpoint {
    let mut c = Checkpoint {
        generation: 7,
        intents: Vec::new(),
    };
    c.upsert(intent("vm-b", 20));
    c.upsert(intent("vm-a", 10));
    c.upsert(IntentRecord {
        vm_id: VmId::new("vm-c").unwrap(),
        selector: VmSelector::LibvirtDomain { name: "web".into() },
        request: PlacementRequest {
            vcpus: 4,
            class: None,
            dedicated: false,
            numa_node: Some(1),
        },
        placement: None,
    });
    c.upsert(IntentRecord {
        vm_id: VmId::new("vm-d").unwrap(),
        selector: VmSelector::CgroupPath {
            path: "/machine.slice/machine-qemu\\x2d1\\x2dd.scope".into(),
        },
        request: PlacementRequest {
            vcpus: 1,
            class: Some(ConfidentialClass::None),
            dedicated: false,
            numa_node: None,
        },
        placement: None,
    });
    c
}

#[test]
fn missing_file_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::in_dir(dir.path().join("not-yet"));
    assert_eq!(store.load().unwrap(), Checkpoint::default());
    assert_eq!(store.reset().unwrap(), None);
}

#[test]
fn round_trip_and_upsert_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::in_dir(dir.path().join("state"));
    let c = sample();
    let ids: Vec<&str> = c.intents.iter().map(|i| i.vm_id.as_str()).collect();
    assert_eq!(ids, vec!["vm-a", "vm-b", "vm-c", "vm-d"]);
    store.save(&c).unwrap();
    assert_eq!(store.load().unwrap(), c);
    assert!(!store.tmp_path().exists(), "temp file renamed away");

    let mut c2 = c.clone();
    let old = c2.upsert(intent("vm-a", 11)).unwrap();
    assert_eq!(old.selector, c.intents[0].selector);
    c2.remove(&VmId::new("vm-b").unwrap()).unwrap();
    c2.generation += 1;
    store.save(&c2).unwrap();
    let back = store.load().unwrap();
    assert_eq!(back, c2);
    assert_eq!(
        back.get(&VmId::new("vm-a").unwrap()).unwrap().selector,
        VmSelector::Process {
            pid: 11,
            start_time: Some(12345)
        }
    );
    assert_eq!(
        back.intents[0].placement.as_ref().unwrap().all_cpus(),
        CpuSet::range(0, 3)
    );

    // The document is readable JSON with the documented envelope.
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.path()).unwrap()).unwrap();
    assert_eq!(v["format"], "sevplace-checkpoint");
    assert_eq!(v["version"], 2);
    assert_eq!(v["payload"]["intents"][0]["vm"]["named"], "vm-a");
    assert_eq!(v["payload"]["intents"][0]["selector"]["kind"], "process");
    assert_eq!(v["payload"]["intents"][0]["placement"]["vcpu_cpus"][1], "1");
}

fn expect_corrupt(store: &CheckpointStore, needle: &str) {
    match store.load() {
        Err(e @ CheckpointError::Corrupt { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg}");
            assert!(msg.contains(&store.path().display().to_string()), "{msg}");
        }
        other => panic!("expected Corrupt({needle}), got {other:?}"),
    }
}

#[test]
fn truncated_file_is_corrupt_and_reset_moves_it_aside() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::in_dir(dir.path());
    store.save(&sample()).unwrap();
    let full = std::fs::read(store.path()).unwrap();
    for cut in [0, 1, full.len() / 2, full.len() - 3] {
        std::fs::write(store.path(), &full[..cut]).unwrap();
        expect_corrupt(
            &store,
            if cut == 0 {
                "truncated (0 bytes)"
            } else {
                "truncated"
            },
        );
    }
    let moved = store.reset().unwrap().unwrap();
    assert!(moved
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("checkpoint.json.bad-"));
    assert_eq!(std::fs::read(&moved).unwrap(), &full[..full.len() - 3]);
    assert!(!store.path().exists());
    assert_eq!(store.load().unwrap(), Checkpoint::default());

    // A second reset in the same second keeps both bad files.
    std::fs::write(store.path(), b"junk").unwrap();
    let moved2 = store.reset().unwrap().unwrap();
    assert_ne!(moved, moved2);
    assert!(moved.exists() && moved2.exists());
}

#[test]
fn crash_during_save_keeps_the_old_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::in_dir(dir.path());
    let c = sample();
    store.save(&c).unwrap();
    // A crash after a partial write of the temp file, before the rename.
    let mut next = c.clone();
    next.generation += 1;
    let bytes = encode(&next).unwrap();
    std::fs::write(store.tmp_path(), &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(store.load().unwrap(), c);
    // The next save overwrites the leftover temp file.
    store.save(&next).unwrap();
    assert_eq!(store.load().unwrap(), next);
}

#[test]
fn checksum_mismatch_bad_json_and_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::in_dir(dir.path());
    store.save(&sample()).unwrap();
    let text = std::fs::read_to_string(store.path()).unwrap();

    // One flipped value inside the payload: valid JSON, wrong checksum.
    let flipped = text.replacen("\"generation\":7", "\"generation\":8", 1);
    assert_ne!(flipped, text);
    std::fs::write(store.path(), &flipped).unwrap();
    expect_corrupt(&store, "checksum mismatch");

    std::fs::write(store.path(), "{\"version\":1,\"format\":").unwrap();
    expect_corrupt(&store, "truncated");
    std::fs::write(store.path(), "not json at all").unwrap();
    expect_corrupt(&store, "not valid JSON");
    std::fs::write(store.path(), "{\"format\":\"x\"}").unwrap();
    expect_corrupt(&store, "no numeric \"version\"");
    let other_format = text.replacen("sevplace-checkpoint", "something-else", 1);
    std::fs::write(store.path(), other_format).unwrap();
    expect_corrupt(&store, "format is \"something-else\"");

    // Valid checksum over a payload of the wrong shape.
    let payload = r#"{"generation":"x"}"#;
    let doc = format!(
        r#"{{"format":"sevplace-checkpoint","version":1,"crc32":"{}","payload":{payload}}}"#,
        crc_hex(payload.as_bytes())
    );
    std::fs::write(store.path(), doc).unwrap();
    expect_corrupt(&store, "bad payload");

    // A vm_id that VmId rejects is corrupt too.
    let payload = r#"{"generation":1,"intents":[{"vm_id":"a/b","selector":{"kind":"libvirt-domain","name":"x"},"request":{"vcpus":1,"class":null,"dedicated":false,"numa_node":null},"placement":null}]}"#;
    let doc = format!(
        r#"{{"format":"sevplace-checkpoint","version":1,"crc32":"{}","payload":{payload}}}"#,
        crc_hex(payload.as_bytes())
    );
    std::fs::write(store.path(), doc).unwrap();
    expect_corrupt(&store, "bad payload");
}

#[test]
fn newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::in_dir(dir.path());
    std::fs::write(
        store.path(),
        r#"{"format":"sevplace-checkpoint","version":3,"crc32":"0","payload":{"whatever":true}}"#,
    )
    .unwrap();
    match store.load() {
        Err(
            e @ CheckpointError::NewerVersion {
                found: 3,
                supported: 2,
                ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("version 3"), "{msg}");
            assert!(msg.contains("checkpoint.json"), "{msg}");
        }
        other => panic!("expected NewerVersion, got {other:?}"),
    }
    // The file is untouched until an explicit reset.
    assert!(store.path().exists());
}

#[test]
fn unreadable_path_is_io_error() {
    let dir = tempfile::tempdir().unwrap();
    // The checkpoint path is a directory.
    let store = CheckpointStore::new(dir.path());
    assert!(matches!(
        store.load(),
        Err(CheckpointError::Io { op: "read", .. })
    ));
}

/// The documented example (docs/discovery.md) is what `encode` writes; a
/// change here is a format change and needs a version bump.
#[test]
fn golden_document() {
    let mut c = Checkpoint {
        generation: 7,
        intents: Vec::new(),
    };
    // vm-a, pid 10 started at 12345, 2 vCPUs SEV-ES dedicated, on 0 and 1,
    // emulator on 2-3.
    c.upsert(intent("vm-a", 10));
    let doc = String::from_utf8(encode(&c).unwrap()).unwrap();
    assert_eq!(
        doc,
        concat!(
            r#"{"format":"sevplace-checkpoint","version":2,"crc32":"9a3b674d","payload":"#,
            r#"{"generation":7,"intents":[{"vm":{"named":"vm-a"},"#,
            r#""selector":{"kind":"process","pid":10,"start_time":12345},"#,
            r#""request":{"vcpus":2,"class":"sev-es","dedicated":true,"numa_node":null},"#,
            r#""placement":{"class":"sev-es","cpus":"0-1","vcpu_cpus":["0","1"],"emulator_cpus":"2-3","#,
            r#""l3_groups":["0-1"],"numa_nodes":[0]}}]}}"#,
            "\n"
        )
    );
}

fn v1_fixture() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/state/testdata/checkpoint-v1.json"
    ))
    .unwrap()
}

/// The file version 1 wrote (testdata/README.md) reads as version 2: each
/// decision once, the class it was placed as and the CPUs from the engine
/// placement, the auto-placed VM under a process key.
#[test]
fn version_1_file_is_migrated() {
    let bytes = v1_fixture();
    let v1: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v1["version"], 1, "the fixture is a version 1 file");
    let c = decode(&bytes).unwrap();
    assert_eq!(c.generation, 5);
    let keys: Vec<VmKey> = c.intents.iter().map(IntentRecord::key).collect();
    assert_eq!(
        keys,
        [
            VmKey::Process(200),
            VmKey::Named(VmId::new("vm-a").unwrap()),
            VmKey::Named(VmId::new("vm-b").unwrap()),
            VmKey::Named(VmId::new("vm-c").unwrap()),
            VmKey::Named(VmId::new("vm-d").unwrap()),
        ]
    );
    for (intent, old) in c
        .intents
        .iter()
        .zip(v1["payload"]["intents"].as_array().unwrap())
    {
        let record = intent.placement.as_ref().unwrap();
        let engine = &old["engine"];
        assert_eq!(
            record.class.as_str(),
            engine["request"]["class"],
            "{}",
            intent.vm_id
        );
        assert_eq!(record.cpus.to_string(), engine["cpus"], "{}", intent.vm_id);
        assert_eq!(
            serde_json::to_value(&record.vcpu_cpus).unwrap(),
            old["placement"]["vcpu_cpus"]
        );
        assert_eq!(
            serde_json::to_value(&record.emulator_cpus).unwrap(),
            old["placement"]["emulator_cpus"]
        );
        assert_eq!(
            serde_json::to_value(&record.numa_nodes).unwrap(),
            engine["numaNodes"]
        );
        assert!(record.l3_groups.is_empty(), "version 1 has no L3 grouping");
    }
    // The class discovery found (the request has none) survives.
    assert_eq!(c.intents[0].request.class, None);
    assert_eq!(
        c.intents[0].placement.as_ref().unwrap().class,
        ConfidentialClass::Sev
    );
    // Saved again, it is a version 2 document that reads back the same.
    let again = encode(&c).unwrap();
    let v2: serde_json::Value = serde_json::from_slice(&again).unwrap();
    assert_eq!(v2["version"], CHECKPOINT_VERSION);
    assert_eq!(v2["payload"]["intents"][0]["vm"]["process"], 200);
    assert!(v2["payload"]["intents"][0].get("engine").is_none());
    assert_eq!(decode(&again).unwrap(), c);
}

fn document(version: u32, payload: &str) -> String {
    format!(
        r#"{{"format":"sevplace-checkpoint","version":{version},"crc32":"{}","payload":{payload}}}"#,
        crc_hex(payload.as_bytes())
    )
}

#[test]
fn typed_keys_are_checked() {
    let intent = |vm: &str| {
        format!(
            r#"{{"generation":1,"intents":[{{"vm":{vm},"selector":{{"kind":"libvirt-domain","name":"x"}},"request":{{"vcpus":1,"class":null,"dedicated":false,"numa_node":null}},"placement":null}}]}}"#
        )
    };
    let c = decode(document(2, &intent(r#"{"process":42}"#)).as_bytes()).unwrap();
    assert_eq!(c.intents[0].key(), VmKey::Process(42));
    let c = decode(document(2, &intent(r#"{"named":"pid-042"}"#)).as_bytes()).unwrap();
    assert_eq!(
        c.intents[0].key(),
        VmKey::Named(VmId::new("pid-042").unwrap())
    );
    // An orchestrator id that reads as a process, pid 0, a bare string and
    // an unknown kind are corrupt, never guessed at.
    for vm in [
        r#"{"named":"pid-42"}"#,
        r#"{"process":0}"#,
        r#""vm-a""#,
        r#"{"uuid":"x"}"#,
    ] {
        match decode(document(2, &intent(vm)).as_bytes()) {
            Err(DecodeFault::Corrupt(what)) => {
                assert!(what.contains("bad payload"), "{vm}: {what}")
            }
            other => panic!("{vm}: {other:?}"),
        }
    }
    // A version 1 intent with a placement and no class anywhere cannot be
    // migrated: refused, not dropped.
    let payload = r#"{"generation":1,"intents":[{"vm_id":"a","selector":{"kind":"libvirt-domain","name":"x"},"request":{"vcpus":1,"class":null,"dedicated":false,"numa_node":null},"placement":{"vcpu_cpus":["0"],"emulator_cpus":null}}]}"#;
    match decode(document(1, payload).as_bytes()) {
        Err(DecodeFault::Corrupt(what)) => assert!(what.contains("cannot be migrated"), "{what}"),
        other => panic!("{other:?}"),
    }
}
