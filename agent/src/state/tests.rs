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
    assert_eq!(v["version"], CHECKPOINT_VERSION);
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
        r#"{"format":"sevplace-checkpoint","version":4,"crc32":"0","payload":{"whatever":true}}"#,
    )
    .unwrap();
    match store.load() {
        Err(
            e @ CheckpointError::NewerVersion {
                found: 4,
                supported: 3,
                ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("version 4"), "{msg}");
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
            r#"{"format":"sevplace-checkpoint","version":3,"crc32":"9a3b674d","payload":"#,
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
    let keys: Vec<VmKey> = c.intents.iter().map(|i| i.key()).collect();
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

// The journal (`journal.rs`).

fn writer_in(dir: &std::path::Path) -> (CheckpointStore, CheckpointWriter) {
    let store = CheckpointStore::in_dir(dir.join("state"));
    (store.clone(), CheckpointWriter::new(store))
}

/// Files of a writer that wrote `c0` (`sample()`) as the snapshot and then
/// `c1` (`c0` plus `vm-e`) as one journal record.
struct OneRecord {
    _dir: tempfile::TempDir,
    store: CheckpointStore,
    w: CheckpointWriter,
    c1: Checkpoint,
}

fn one_record() -> OneRecord {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut w) = writer_in(dir.path());
    let c0 = sample();
    assert!(matches!(
        w.write(&Checkpoint::default(), &c0).unwrap(),
        Written::Snapshot(_)
    ));
    let c1 = next_of(&c0, |n| {
        n.upsert(intent("vm-e", 50));
    });
    assert!(matches!(w.write(&c0, &c1).unwrap(), Written::Journal(_)));
    OneRecord {
        _dir: dir,
        store,
        w,
        c1,
    }
}

/// `c` with generation + 1 after `change`.
fn next_of(c: &Checkpoint, change: impl FnOnce(&mut Checkpoint)) -> Checkpoint {
    let mut n = c.clone();
    n.generation += 1;
    change(&mut n);
    n
}

/// The first write is a snapshot, the next ones append one record each
/// (an upsert, a replacement, a removal); the snapshot is not rewritten,
/// and a load applies the records to it.
#[test]
fn journal_records_complete_the_snapshot_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut w) = writer_in(dir.path());
    let c0 = sample();
    assert!(matches!(
        w.write(&Checkpoint::default(), &c0).unwrap(),
        Written::Snapshot(_)
    ));
    let snapshot = std::fs::read(store.path()).unwrap();
    let c1 = next_of(&c0, |n| {
        n.upsert(intent("vm-e", 50));
    });
    let c2 = next_of(&c1, |n| {
        n.upsert(intent("vm-a", 11));
    });
    let c3 = next_of(&c2, |n| {
        n.remove(&VmId::new("vm-b").unwrap());
    });
    for (old, new) in [(&c0, &c1), (&c1, &c2), (&c2, &c3)] {
        assert!(matches!(w.write(old, new).unwrap(), Written::Journal(_)));
    }
    assert_eq!(
        std::fs::read(store.path()).unwrap(),
        snapshot,
        "snapshot untouched"
    );
    let journal = std::fs::read_to_string(store.journal_path()).unwrap();
    assert_eq!(journal.lines().count(), 3, "{journal}");
    assert!(
        journal
            .lines()
            .nth(2)
            .unwrap()
            .contains(r#""remove":[{"named":"vm-b"}]"#),
        "{journal}"
    );
    assert_eq!(store.load().unwrap(), c3);
}

/// A record holds only what changed: an intent the new checkpoint shares
/// with the old one is left out.
#[test]
fn a_delta_holds_only_the_changed_intents() {
    let c0 = sample();
    let c1 = next_of(&c0, |n| {
        n.upsert(intent("vm-c", 30));
        n.remove(&VmId::new("vm-d").unwrap());
    });
    let d = journal::Delta::between(&c0, &c1);
    assert_eq!((d.from, d.to), (7, 8));
    let ids: Vec<&str> = d.upserts.iter().map(|i| i.vm_id.as_str()).collect();
    assert_eq!(ids, ["vm-c"]);
    assert_eq!(d.removes, [VmId::new("vm-d").unwrap()]);
    // Equal intents that are not the same allocation are left out too.
    let mut copy = c0.clone();
    copy.intents = c0
        .intents
        .iter()
        .map(|i| Arc::new(IntentRecord::clone(i)))
        .collect();
    copy.generation += 1;
    let d = journal::Delta::between(&c0, &copy);
    assert!(d.upserts.is_empty() && d.removes.is_empty());
    let mut back = c0.clone();
    journal::Delta::between(&c0, &c1).apply_to(&mut back);
    assert_eq!(back, c1);
}

/// A crash mid-append leaves a partial last line (or zeros where the file
/// grew before its data reached the disk): that write was never
/// acknowledged and is ignored; the next write of a new writer is a
/// snapshot, so nothing is appended after the torn bytes.
#[test]
fn a_torn_last_append_is_ignored() {
    for tail in [&br#"{"crc32":"0000"#[..], &[0u8; 300][..], b"{}\n"] {
        let OneRecord { store, c1, .. } = &one_record();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(store.journal_path())
            .unwrap();
        std::io::Write::write_all(&mut f, tail).unwrap();
        assert_eq!(&store.load().unwrap(), c1);

        let mut w = CheckpointWriter::new(store.clone());
        let c2 = next_of(c1, |n| {
            n.remove(&VmId::new("vm-a").unwrap());
        });
        assert!(matches!(w.write(c1, &c2).unwrap(), Written::Snapshot(_)));
        assert_eq!(std::fs::metadata(store.journal_path()).unwrap().len(), 0);
        let c3 = next_of(&c2, |n| {
            n.upsert(intent("vm-f", 60));
        });
        assert!(matches!(w.write(&c2, &c3).unwrap(), Written::Journal(_)));
        assert_eq!(store.load().unwrap(), c3);
    }
}

/// A bad record with a good one after it is not a torn append: the
/// journal is corrupt, named with the line.
#[test]
fn a_bad_record_before_a_good_one_is_corrupt() {
    let OneRecord {
        _dir,
        store,
        mut w,
        c1,
    } = one_record();
    let c2 = next_of(&c1, |n| {
        n.upsert(intent("vm-f", 60));
    });
    w.write(&c1, &c2).unwrap();
    let text = std::fs::read_to_string(store.journal_path()).unwrap();
    let bad = text.replacen("vm-e", "vm-x", 1);
    std::fs::write(store.journal_path(), bad).unwrap();
    match store.load() {
        Err(CheckpointError::Corrupt { path, what }) => {
            assert_eq!(path, store.journal_path());
            assert!(
                what.contains("line 1") && what.contains("checksum"),
                "{what}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Records a snapshot already covers (a crash between the snapshot's
/// rename and the journal's truncation) are skipped; a record that does not
/// start where the checkpoint is, is corrupt.
#[test]
fn records_chain_onto_the_snapshot() {
    let OneRecord {
        _dir, store, c1, ..
    } = one_record();
    let journal = std::fs::read(store.journal_path()).unwrap();
    // The snapshot of c1 written, the journal not yet emptied.
    store.save(&c1).unwrap();
    std::fs::write(store.journal_path(), &journal).unwrap();
    assert_eq!(store.load().unwrap(), c1);

    // On the snapshot at generation 8, a record from 9 to 10.
    let c2 = next_of(&c1, |n| {
        n.remove(&VmId::new("vm-e").unwrap());
    });
    let c3 = next_of(&c2, |n| {
        n.remove(&VmId::new("vm-a").unwrap());
    });
    let line = journal::encode_line(&journal::Delta::between(&c2, &c3)).unwrap();
    std::fs::write(store.journal_path(), line).unwrap();
    match store.load() {
        Err(CheckpointError::Corrupt { what, .. }) => {
            assert!(what.contains("does not follow generation 8"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    // A journal without its snapshot does not chain on generation 0.
    std::fs::remove_file(store.path()).unwrap();
    assert!(matches!(store.load(), Err(CheckpointError::Corrupt { .. })));
}

/// The snapshot is rewritten, and the journal emptied, when the journal
/// would outgrow the snapshot and the minimum; the files read back as the
/// last checkpoint written at every step.
#[test]
fn the_journal_is_folded_into_a_snapshot_when_it_outgrows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, w) = writer_in(dir.path());
    let mut w = w.with_journal_min(8 * 1024);
    let mut c = sample();
    w.write(&Checkpoint::default(), &c).unwrap();
    let snapshot = std::fs::metadata(store.path()).unwrap().len();
    let (mut journals, mut snapshots) = (0, 0);
    for k in 0..200u32 {
        let next = next_of(&c, |n| {
            n.upsert(intent(&format!("vm-n{}", k % 10), k + 100));
        });
        match w.write(&c, &next).unwrap() {
            Written::Journal(_) => journals += 1,
            Written::Snapshot(_) => snapshots += 1,
        }
        let len = std::fs::metadata(store.journal_path()).unwrap().len();
        assert!(
            len <= snapshot.max(8 * 1024) + 1024,
            "journal of {len} bytes"
        );
        c = next;
        if k % 37 == 0 {
            assert_eq!(store.load().unwrap(), c, "after write {k}");
        }
    }
    assert!(
        snapshots >= 3,
        "{journals} journal writes, {snapshots} snapshots"
    );
    assert!(
        journals > 5 * snapshots,
        "{journals} journal writes, {snapshots} snapshots"
    );
    assert_eq!(store.load().unwrap(), c);
}

/// A failed append leaves the durable checkpoint readable as it was; the
/// writer's next write is a snapshot.
#[test]
fn after_a_failed_append_the_next_write_is_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut w) = writer_in(dir.path());
    let c0 = sample();
    w.write(&Checkpoint::default(), &c0).unwrap();
    std::fs::remove_file(store.journal_path()).ok();
    // The journal's name taken by a directory: the append cannot open it.
    std::fs::create_dir(store.journal_path()).unwrap();
    let c1 = next_of(&c0, |n| {
        n.upsert(intent("vm-e", 50));
    });
    assert!(matches!(
        w.write(&c0, &c1),
        Err(CheckpointError::Io {
            op: "open journal",
            ..
        })
    ));
    std::fs::remove_dir(store.journal_path()).unwrap();
    assert_eq!(store.load().unwrap(), c0);
    assert!(matches!(w.write(&c0, &c1).unwrap(), Written::Snapshot(_)));
    assert_eq!(store.load().unwrap(), c1);
}

/// Reset moves the journal aside with the snapshot; a journal alone is
/// moved too.
#[test]
fn reset_moves_the_journal_aside_too() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut w) = writer_in(dir.path());
    let c0 = sample();
    w.write(&Checkpoint::default(), &c0).unwrap();
    let c1 = next_of(&c0, |n| {
        n.upsert(intent("vm-e", 50));
    });
    w.write(&c0, &c1).unwrap();
    let moved = store.reset().unwrap().unwrap();
    assert!(!store.path().exists() && !store.journal_path().exists());
    let name = moved.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("checkpoint.json.bad-"), "{name}");
    let journal_name = format!(
        "checkpoint.json.journal.bad-{}",
        &name["checkpoint.json.bad-".len()..]
    );
    assert!(moved.with_file_name(journal_name).is_file());
    assert_eq!(store.load().unwrap(), Checkpoint::default());

    std::fs::write(store.journal_path(), b"junk").unwrap();
    let moved = store.reset().unwrap().unwrap();
    assert!(
        moved.to_string_lossy().contains(".journal.bad-"),
        "{}",
        moved.display()
    );
}

/// A version 2 snapshot (written whole on every change, no journal) is
/// read as it is.
#[test]
fn a_version_2_snapshot_is_read() {
    let c = sample();
    let payload = serde_json::to_string(&c).unwrap();
    let doc = document(2, &payload);
    assert_eq!(decode(doc.as_bytes()).unwrap(), c);
}
