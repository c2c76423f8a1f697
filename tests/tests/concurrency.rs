//! Hundreds of concurrent PlaceVm/ReleaseVm calls (overlapping vm_ids,
//! validate_only mixed in) at the real daemon: no CPU double-assigned,
//! every acknowledged call reflected in ListVms and in the checkpoint,
//! identical results for identical retries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sevplace_proto::v1 as pb;
use sevplace_tests::Daemon;

const THREADS: u32 = 8;
const OWNED_PER_THREAD: u32 = 6;
const SHARED: u32 = 6;

fn request(id: &str, n: u32, validate_only: bool) -> pb::PlaceVmRequest {
    // The request is a function of the id, so every retry is identical.
    let class = match n % 4 {
        0 => pb::ConfidentialClass::None,
        1 => pb::ConfidentialClass::Sev,
        2 => pb::ConfidentialClass::SevEs,
        _ => pb::ConfidentialClass::SevSnp,
    };
    pb::PlaceVmRequest {
        vm_id: id.to_string(),
        vcpus: 1 + n % 6,
        confidential_class: class as i32,
        shared: n % 5 == 0,
        validate_only,
        ..Default::default()
    }
}

#[test]
fn concurrent_place_and_release() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/genoa-2x96-nps1");
    let d = Daemon::start(&["--host-root", root.to_str().unwrap()]);
    let socket = d.socket.clone();
    // Final expected presence of each owned id, and every answer for each
    // shared id.
    let owned_final: Arc<Mutex<BTreeMap<String, bool>>> = Arc::default();
    let shared_answers: Arc<Mutex<BTreeMap<String, Vec<Vec<u32>>>>> = Arc::default();
    let mut workers = Vec::new();
    for t in 0..THREADS {
        let socket = socket.clone();
        let owned_final = owned_final.clone();
        let shared_answers = shared_answers.clone();
        workers.push(std::thread::spawn(move || {
            let rt = sevplace_tests::runtime();
            rt.block_on(async {
                let mut c = sevplace::client::connect(&socket).await.unwrap();
                let mut x: u32 = 0x9e37_79b9 ^ (t + 1);
                for step in 0..48u32 {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    match x % 4 {
                        // Place or release one of this thread's own ids.
                        0 | 1 => {
                            let n = t * OWNED_PER_THREAD + x % OWNED_PER_THREAD;
                            let id = format!("own-{n}");
                            if x % 4 == 0 {
                                match c.place_vm(request(&id, n, false)).await {
                                    Ok(_) => {
                                        owned_final.lock().unwrap().insert(id, true);
                                    }
                                    Err(s) => assert_eq!(
                                        s.code(),
                                        tonic::Code::ResourceExhausted,
                                        "{s:?}"
                                    ),
                                }
                            } else {
                                match c
                                    .release_vm(pb::ReleaseVmRequest { vm_id: id.clone() })
                                    .await
                                {
                                    Ok(_) => {
                                        owned_final.lock().unwrap().insert(id, false);
                                    }
                                    Err(s) => assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}"),
                                }
                            }
                        }
                        // Everyone places the shared ids with identical requests.
                        2 => {
                            let n = 1000 + x % SHARED;
                            let id = format!("shared-{n}");
                            match c.place_vm(request(&id, n, false)).await {
                                Ok(r) => {
                                    let cpus = r
                                        .into_inner()
                                        .vm
                                        .and_then(|v| v.placement)
                                        .map(|p| p.cpus)
                                        .unwrap_or_default();
                                    shared_answers
                                        .lock()
                                        .unwrap()
                                        .entry(id)
                                        .or_default()
                                        .push(cpus);
                                }
                                Err(s) => {
                                    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}")
                                }
                            }
                        }
                        // validate_only changes nothing.
                        _ => {
                            let id = format!("dry-{t}-{step}");
                            let _ = c.place_vm(request(&id, step, true)).await;
                        }
                    }
                }
            });
        }));
    }
    for w in workers {
        w.join().expect("worker");
    }

    let rt = sevplace_tests::runtime();
    let vms = rt.block_on(async {
        let mut c = sevplace::client::connect(&socket).await.unwrap();
        c.list_vms(pb::ListVmsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vms
    });
    // No CPU held by two dedicated VMs.
    let mut taken = BTreeMap::new();
    for v in &vms {
        let p = v.placement.clone().unwrap_or_default();
        if !v.shared {
            for c in p.cpus {
                if let Some(other) = taken.insert(c, v.vm_id.clone()) {
                    panic!("CPU {c} given to {other} and {}", v.vm_id);
                }
            }
        }
    }
    // Acknowledged calls are reflected; validate_only left nothing.
    let listed: Vec<&str> = vms.iter().map(|v| v.vm_id.as_str()).collect();
    for (id, present) in owned_final.lock().unwrap().iter() {
        assert_eq!(listed.contains(&id.as_str()), *present, "{id}");
    }
    assert!(!listed.iter().any(|id| id.starts_with("dry-")));
    // Identical retries got identical answers.
    for (id, answers) in shared_answers.lock().unwrap().iter() {
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "{id}: {answers:?}"
        );
        assert!(listed.contains(&id.as_str()), "{id}");
    }
    // The checkpoint holds exactly what ListVms shows.
    let cp = sevplace::state::CheckpointStore::in_dir(d.dir.path().join("state"))
        .load()
        .expect("checkpoint");
    let mut in_cp: Vec<String> = cp.intents.iter().map(|i| i.vm_id.to_string()).collect();
    let mut in_list: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    in_cp.sort();
    in_list.sort();
    assert_eq!(in_cp, in_list);
    assert!(
        in_list.len() >= SHARED as usize / 2,
        "too few placements to mean anything: {in_list:?}"
    );
}
