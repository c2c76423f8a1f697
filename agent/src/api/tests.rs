//! The service over a real Unix socket in-process, on a fake host (procfs,
//! sevflush tree): ScrubVm writes `scrub` and reports what it flushed, and a
//! WatchEvents client that does not read is dropped with a status.

use std::sync::Arc;
use std::time::Duration;

use sevplace_proto::v1 as pb;
use sevplace_proto::v1::sevplace_service_server::SevplaceServiceServer;
use tokio_stream::wrappers::UnixListenerStream;

use super::*;
use crate::cgroup::CgroupError;
use crate::cgroup::ThreadAffinity;
use crate::cpuset::CpuSet;
use crate::discovery::fake_procfs::{write_process, FakeProcess};
use crate::discovery::VmScanner;
use crate::kmod::ModuleReader;
use crate::metrics::Metrics;
use crate::placement::Reservations;
use crate::reconcile::events::EventBus;
use crate::reconcile::{AgentCore, HostAccess, PlaceCall};
use crate::state::CheckpointStore;
use crate::topology::Topology;
use crate::types::{ConfidentialClass, VmId};

/// The tids of a fake procfs are not real threads: affinity is not set.
struct NoAffinity;
impl ThreadAffinity for NoAffinity {
    fn set(&self, _: u32, _: &CpuSet) -> Result<(), CgroupError> {
        Ok(())
    }
}

struct Served {
    dir: tempfile::TempDir,
    ctx: Arc<AgentContext>,
    socket: std::path::PathBuf,
}

async fn serve(event_capacity: usize) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let proc_root = dir.path().join("proc");
    let module = dir.path().join("sevflush");
    write_process(
        &proc_root,
        &FakeProcess::qemu_vm(
            900,
            2,
            &["qemu-system-x86_64", "-object", "sev-guest,id=s,policy=0x1"],
        ),
    )
    .unwrap();
    crate::kmod::fake_tree::write_globals(&module, "targeted", [0; 5]).unwrap();
    crate::kmod::fake_tree::write_record(&module, 3, 900, "0-3", "0-7", 0, 0).unwrap();
    let metrics = Arc::new(Metrics::new());
    let events = Arc::new(EventBus::new(event_capacity));
    let mut core = AgentCore::new(
        Arc::new(Topology::synthetic(1, 8, 8, 2, 1)),
        Reservations::default(),
        HostAccess {
            scanner: VmScanner::new(&proc_root),
            cgroups: None,
            module: ModuleReader::new(&module),
            affinity: Arc::new(NoAffinity),
        },
        CheckpointStore::in_dir(dir.path().join("state")),
        metrics.clone(),
        events.clone(),
    )
    .unwrap();
    let scan = core.scanner().scan().unwrap();
    core.reconcile(scan);
    core.place(PlaceCall {
        vm_id: VmId::new("vm-s").unwrap(),
        selector: Some(crate::state::VmSelector::Process {
            pid: 900,
            start_time: None,
        }),
        request: crate::state::PlacementRequest {
            vcpus: 2,
            class: Some(ConfidentialClass::Sev),
            dedicated: true,
            numa_node: None,
        },
        validate_only: false,
    })
    .unwrap();
    let ctx = Arc::new(AgentContext {
        core: Arc::new(crate::reconcile::priority::PriorityMutex::new(core)),
        access: crate::access::AccessPolicy::default(),
        events,
        metrics,
    });
    let socket = dir.path().join("api.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let svc = SevplaceServiceServer::new(SevplaceApi::new(ctx.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    Served { dir, ctx, socket }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_writes_the_module_and_reports_the_flushed_cpus() {
    if !nix::unistd::Uid::effective().is_root() {
        crate::skip::skip(
            "scrub_writes_the_module_and_reports_the_flushed_cpus",
            "root",
            "mutating calls need root (peer credentials)",
        );
        return;
    }
    let s = serve(64).await;
    let mut c = crate::client::connect(&s.socket).await.unwrap();
    let r = c
        .scrub_vm(pb::ScrubVmRequest {
            vm_id: "vm-s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.flushed_cpus, vec![0, 1, 2, 3]);
    assert!(r.duration.is_some());
    assert_eq!(
        std::fs::read_to_string(s.dir.path().join("sevflush/vms/3/scrub")).unwrap(),
        "1\n"
    );
    // A second scrub of the same VM within the interval (1 s by default)
    // is refused with the time to wait, and the module is not asked.
    std::fs::write(s.dir.path().join("sevflush/vms/3/scrub"), "").unwrap();
    let e = c
        .scrub_vm(pb::ScrubVmRequest {
            vm_id: "vm-s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let retry = tonic_types::StatusExt::get_error_details(&e)
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(retry <= std::time::Duration::from_secs(1), "{retry:?}");
    assert_eq!(
        std::fs::read_to_string(s.dir.path().join("sevflush/vms/3/scrub")).unwrap(),
        ""
    );
    // GetVm carries the module's view and the blast radius.
    let vm = c
        .get_vm(pb::GetVmRequest {
            vm_id: "vm-s".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let f = vm.flush.unwrap();
    assert!(f.tracked);
    assert_eq!(f.dirty_cpus, vec![0, 1, 2, 3]);
    assert_eq!(f.blast_radius_l3_domains, 1);
    assert_eq!(f.blast_radius_cpus, 16);
    // Unknown VM and a VM the module does not track.
    let e = c
        .scrub_vm(pb::ScrubVmRequest {
            vm_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    std::fs::remove_dir_all(s.dir.path().join("sevflush/vms/3")).unwrap();
    let e = c
        .scrub_vm(pb::ScrubVmRequest {
            vm_id: "vm-s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_does_not_read_is_dropped_with_a_status() {
    let s = serve(32).await;
    let mut c = crate::client::connect(&s.socket).await.unwrap();
    let mut stream = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // The agent publishes far more than the watcher's buffer holds; it
    // never blocks on the watcher.
    let start = std::time::Instant::now();
    for i in 0..20_000u32 {
        s.ctx.events.publish(
            "vm-s",
            crate::reconcile::events::EventKind::Exited { pid: i },
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "publishing blocked"
    );
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without a status"),
                Err(st) => return st,
            }
        }
    })
    .await
    .expect("a status within 20 s");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("behind"), "{status:?}");
    // The service still answers.
    assert!(c.get_host(pb::GetHostRequest {}).await.is_ok());
}
