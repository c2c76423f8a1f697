//! The `sevplace.v1` gRPC service.

pub mod convert;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use sevplace_proto::v1 as pb;
use sevplace_proto::v1::sevplace_service_server::SevplaceService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::cpuset::CpuSet;
use crate::kmod::ModuleReader;
use crate::metrics::Metrics;
use crate::topology::Topology;

/// What the service reads and acts on.
pub struct AgentContext {
    pub topology: Topology,
    pub reserved_cpus: CpuSet,
    pub metrics: Arc<Metrics>,
    pub module: ModuleReader,
}

/// The gRPC service implementation.
pub struct SevplaceApi {
    ctx: Arc<AgentContext>,
}

impl SevplaceApi {
    pub fn new(ctx: Arc<AgentContext>) -> Self {
        Self { ctx }
    }

    fn observe<T>(&self, method: &str, start: Instant, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.ctx.metrics.observe_grpc(method, code, start.elapsed());
    }

    fn host(&self) -> pb::Host {
        let ctx = &self.ctx;
        let reserved = &ctx.reserved_cpus;
        pb::Host {
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            topology: Some(convert::topology(
                &ctx.topology,
                |_| pb::Pool::General,
                |d| ctx.topology.l3_domains[d].cpus.difference(reserved),
            )),
            reserved_cpus: convert::cpus(reserved),
            confidential_pool_l3_domains: Vec::new(),
            capacity: Vec::new(),
            module: Some(convert::module_status(&ctx.module.status())),
            vm_count: 0,
        }
    }
}

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented by this agent version"))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SevplaceService for SevplaceApi {
    async fn get_host(
        &self,
        _req: Request<pb::GetHostRequest>,
    ) -> Result<Response<pb::GetHostResponse>, Status> {
        let start = Instant::now();
        let r = Ok(pb::GetHostResponse {
            host: Some(self.host()),
        });
        self.observe("GetHost", start, &r);
        r.map(Response::new)
    }

    async fn place_vm(
        &self,
        _req: Request<pb::PlaceVmRequest>,
    ) -> Result<Response<pb::PlaceVmResponse>, Status> {
        let start = Instant::now();
        let r = Err(unimplemented("PlaceVm"));
        self.observe("PlaceVm", start, &r);
        r
    }

    async fn release_vm(
        &self,
        _req: Request<pb::ReleaseVmRequest>,
    ) -> Result<Response<pb::ReleaseVmResponse>, Status> {
        let start = Instant::now();
        let r = Err(unimplemented("ReleaseVm"));
        self.observe("ReleaseVm", start, &r);
        r
    }

    async fn get_vm(
        &self,
        _req: Request<pb::GetVmRequest>,
    ) -> Result<Response<pb::GetVmResponse>, Status> {
        let start = Instant::now();
        let r = Err(unimplemented("GetVm"));
        self.observe("GetVm", start, &r);
        r
    }

    async fn list_vms(
        &self,
        _req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let start = Instant::now();
        let r = Err(unimplemented("ListVms"));
        self.observe("ListVms", start, &r);
        r
    }

    async fn scrub_vm(
        &self,
        _req: Request<pb::ScrubVmRequest>,
    ) -> Result<Response<pb::ScrubVmResponse>, Status> {
        let start = Instant::now();
        let r = Err(unimplemented("ScrubVm"));
        self.observe("ScrubVm", start, &r);
        r
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let start = Instant::now();
        let r: Result<Response<EventStream>, Status> = Err(unimplemented("WatchEvents"));
        self.observe("WatchEvents", start, &r);
        r
    }
}
