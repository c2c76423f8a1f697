//! The `sevplace.v1` gRPC service: validates requests at the edge, runs
//! the agent core's operations off the async threads, and converts results
//! and errors (gRPC status codes with field details).

pub(crate) mod audit;
pub(crate) mod convert;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use sevplace_proto::v1 as pb;
use sevplace_proto::v1::sevplace_service_server::SevplaceService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::access::{authorize, Need, Peer};
use crate::kmod::ModuleVm;
use crate::placement::PlaceError;
use crate::reconcile::{AgentContext, AgentCore, AgentError, PlaceCall};
use crate::state::{PlacementRequest, VmSelector};
use crate::types::{VmId, VmKey};

/// The gRPC service implementation.
pub(crate) struct SevplaceApi {
    ctx: Arc<AgentContext>,
    /// The fleet reporter's consumer store and wake-up; `None` when
    /// `[fleet]` is off.
    fleet: Option<Arc<crate::fleet::FleetLink>>,
}

fn invalid(field: &str, reason: impl Into<String>) -> Status {
    let reason = reason.into();
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("invalid {field}: {reason}"),
        ErrorDetails::with_bad_request_violation(field, reason),
    )
}

/// Maps core errors to gRPC status codes: the one place that knows both.
pub(crate) fn status_of(e: AgentError) -> Status {
    match e {
        e @ (AgentError::BadField { .. }
        | AgentError::ReservedVmId(_)
        | AgentError::NotAVm { .. }
        | AgentError::Unclassified) => match e.field_violation() {
            Some((field, reason)) => invalid(field, reason),
            None => Status::invalid_argument(e.to_string()),
        },
        e @ (AgentError::NoSuchProcess { .. }
        | AgentError::NoSuchVm(_)
        | AgentError::NotPlaced(_)) => Status::not_found(e.to_string()),
        e @ AgentError::PlacedDifferently(_) => Status::already_exists(e.to_string()),
        e @ (AgentError::SelectorUnresolved(_)
        | AgentError::HeldByOther { .. }
        | AgentError::ExitedWhilePinning(_)
        | AgentError::NotRunning(_)
        | AgentError::ModuleUnreadable(_)
        | AgentError::NotTrackedByModule { .. }) => Status::failed_precondition(e.to_string()),
        AgentError::Place(PlaceError::InvalidRequest { field, reason }) => invalid(field, reason),
        AgentError::Place(e @ PlaceError::NotEnoughCapacity { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        AgentError::Place(e @ PlaceError::Conflict { .. }) => Status::already_exists(e.to_string()),
        AgentError::Checkpoint(e) => Status::unavailable(e.to_string()),
        AgentError::Discovery(e) => Status::internal(e.to_string()),
        e @ AgentError::ScrubTooSoon { retry_after, .. } => Status::with_error_details(
            tonic::Code::ResourceExhausted,
            e.to_string(),
            ErrorDetails::with_retry_info(Some(retry_after)),
        ),
        AgentError::Scrub(e) => Status::internal(e.to_string()),
    }
}

fn vm_id(s: &str) -> Result<VmId, Status> {
    VmId::new(s).map_err(|e| invalid("vm_id", e.to_string()))
}

/// Validates a PlaceVm request.
pub(crate) fn place_call(r: &pb::PlaceVmRequest) -> Result<PlaceCall, Status> {
    let selector = match r.selector.as_ref().and_then(|s| s.selector.as_ref()) {
        None => None,
        Some(pb::vm_selector::Selector::Pid(p)) => Some(VmSelector::Process {
            pid: *p,
            start_time: None,
        }),
        Some(pb::vm_selector::Selector::LibvirtDomain(d)) => {
            if d.is_empty() || d.len() > 256 || d.contains('/') {
                return Err(invalid("selector.libvirt_domain", "1-256 bytes, no '/'"));
            }
            Some(VmSelector::LibvirtDomain { name: d.clone() })
        }
        Some(pb::vm_selector::Selector::CgroupPath(p)) => {
            Some(VmSelector::CgroupPath { path: p.clone() })
        }
    };
    if let Some(s) = &selector {
        crate::state::selector::validate(s).map_err(|e| invalid(e.field, e.reason))?;
    }
    let class = pb::ConfidentialClass::try_from(r.confidential_class).map_err(|_| {
        invalid(
            "confidential_class",
            format!("unknown value {}", r.confidential_class),
        )
    })?;
    if r.vcpus == 0 {
        return Err(invalid("vcpus", "must be at least 1"));
    }
    Ok(PlaceCall {
        vm_id: VmKey::named(&r.vm_id).map_err(|e| invalid("vm_id", e.to_string()))?,
        selector,
        request: PlacementRequest {
            vcpus: r.vcpus,
            class: convert::class_from_pb(class),
            // The wire's one polarity flip: the agent speaks `dedicated`.
            dedicated: !r.shared,
            numa_node: r.numa_node,
        },
        validate_only: r.validate_only,
    })
}

/// Validates PlaceVm's Placement consumer; one is refused where fleet
/// reporting is off (nobody would keep its allocation true).
pub(crate) fn placement_consumer(
    r: &pb::PlaceVmRequest,
    fleet_on: bool,
) -> Result<Option<crate::fleet::Consumer>, Status> {
    let Some(c) = &r.placement_consumer else {
        return Ok(None);
    };
    let consumer = crate::fleet::consumer_from_parts(&c.uuid, &c.project_id, &c.user_id)
        .map_err(|(field, reason)| invalid(field, reason))?;
    if !fleet_on {
        return Err(Status::failed_precondition(
            "placement_consumer given, but fleet reporting is off on this agent ([fleet] enabled = false)",
        ));
    }
    Ok(Some(consumer))
}

const PAGE_TOKEN_PREFIX: &str = "after:";

impl SevplaceApi {
    #[cfg(test)]
    pub(crate) fn new(ctx: Arc<AgentContext>) -> Self {
        Self { ctx, fleet: None }
    }

    /// With fleet reporting: PlaceVm records Placement consumers in `link`.
    pub(crate) fn with_fleet(
        ctx: Arc<AgentContext>,
        link: Option<Arc<crate::fleet::FleetLink>>,
    ) -> Self {
        Self { ctx, fleet: link }
    }

    /// Checks the caller (SO_PEERCRED on the Unix socket, the certificate
    /// names on mutual TLS); a denial is PERMISSION_DENIED and a log line
    /// with uid and pid or the names and address.
    fn authorize(&self, method: &str, peer: &Peer, need: Need) -> Result<(), Status> {
        authorize(peer, need, &self.ctx.access).map_err(|reason| {
            let caller = audit::Caller(peer);
            tracing::warn!(method, %caller, %reason, "permission denied");
            Status::permission_denied(reason)
        })
    }

    /// [`Self::authorize`], with a denial counted like any other answer.
    fn admit<T>(
        &self,
        method: &str,
        req: &Request<T>,
        need: Need,
        start: Instant,
    ) -> Result<(), Status> {
        self.admit_peer(method, &peer_of(req), need, start)
    }

    /// [`Self::admit`] for a caller already read from the request.
    fn admit_peer(
        &self,
        method: &str,
        peer: &Peer,
        need: Need,
        start: Instant,
    ) -> Result<(), Status> {
        let r = self.authorize(method, peer, need);
        if r.is_err() {
            self.observe(method, start, &r);
        }
        r
    }

    fn observe<T>(&self, method: &str, start: Instant, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.ctx.metrics.observe_grpc(method, code, start.elapsed());
    }

    /// Runs `f` on the core on a blocking thread.
    async fn with_core<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut AgentCore) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || f(&mut ctx.lock()))
            .await
            .map_err(|e| Status::internal(format!("worker failed: {e}")))?
    }

    /// Runs `f` on a blocking thread with the context, for calls that take
    /// the core's lock more than once (decide, wait for the write, finish).
    async fn with_ctx<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AgentContext) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || f(&ctx))
            .await
            .map_err(|e| Status::internal(format!("worker failed: {e}")))?
    }
}

/// The caller as the transport knows it: SO_PEERCRED on the Unix socket,
/// the certificate names on mutual TLS, nothing on plaintext TCP.
fn peer_of<T>(req: &Request<T>) -> Peer {
    let uds = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred);
    let tls = req.extensions().get::<crate::tls::TlsPeerInfo>();
    match (uds, tls) {
        (Some(c), _) => Peer::Local {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
            gids: crate::access::groups_of(c.uid(), c.gid()),
        },
        (None, Some(t)) => Peer::Tls {
            names: t.names.to_vec(),
            addr: t.remote_addr,
        },
        (None, None) => Peer::Remote,
    }
}

/// A VM by id, or NOT_FOUND.
fn known_vm(core: &AgentCore, id: &str) -> Result<crate::reconcile::VmView, Status> {
    core.view(id)
        .ok_or_else(|| Status::not_found(format!("no VM {id:?}")))
}

fn vm_pb(core: &AgentCore, v: &crate::reconcile::VmView, records: &[ModuleVm]) -> pb::Vm {
    let record = v.pid.and_then(|pid| records.iter().find(|r| r.pid == pid));
    convert::vm(core.topology(), v, record)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SevplaceService for SevplaceApi {
    async fn get_host(
        &self,
        req: Request<pb::GetHostRequest>,
    ) -> Result<Response<pb::GetHostResponse>, Status> {
        let start = Instant::now();
        self.admit("GetHost", &req, Need::Read, start)?;
        let r = self
            .with_core(|core| {
                Ok(pb::GetHostResponse {
                    host: Some(convert::host(core)),
                })
            })
            .await;
        self.observe("GetHost", start, &r);
        r.map(Response::new)
    }

    async fn place_vm(
        &self,
        req: Request<pb::PlaceVmRequest>,
    ) -> Result<Response<pb::PlaceVmResponse>, Status> {
        let start = Instant::now();
        let peer = peer_of(&req);
        let audit_vm = req.get_ref().vm_id.clone();
        if let Err(s) = self.admit_peer("PlaceVm", &peer, Need::Admin, start) {
            audit::record(&self.ctx.metrics, "PlaceVm", &audit_vm, &peer, Err(&s));
            return Err(s);
        }
        let consumer = placement_consumer(req.get_ref(), self.fleet.is_some());
        let r = match place_call(req.get_ref()).and_then(|c| consumer.map(|k| (c, k))) {
            Ok((call, consumer)) => {
                let validate_only = call.validate_only;
                let fleet = self.fleet.clone();
                self.with_ctx(move |ctx| {
                    let vm_id = call.vm_id.clone();
                    // Decided under the lock, written without it.
                    let (decision, recorded, log) = {
                        let mut core = ctx.lock();
                        let recorded = match (&fleet, consumer, validate_only) {
                            (Some(link), Some(c), false) => {
                                let before = crate::fleet::record_consumer(link, &call.vm_id, c)
                                    .map_err(|e| Status::unavailable(e.to_string()))?;
                                Some((link.clone(), before))
                            }
                            _ => None,
                        };
                        (core.decide_place(call), recorded, core.log())
                    };
                    let written = log.wait(&decision.ticket);
                    let mut core = ctx.lock();
                    let placed = core.finish_place(decision, written);
                    if let (Err(_), Some((link, before))) = (&placed, recorded) {
                        crate::fleet::restore_consumer(&link, &vm_id, before);
                    }
                    let view = placed.map_err(status_of)?;
                    let records = core.module_records();
                    Ok(pb::PlaceVmResponse {
                        vm: Some(vm_pb(&core, &view, &records)),
                        validated_only: validate_only,
                    })
                })
                .await
            }
            Err(s) => Err(s),
        };
        self.observe("PlaceVm", start, &r);
        audit::record(
            &self.ctx.metrics,
            "PlaceVm",
            &audit_vm,
            &peer,
            r.as_ref().map(|_| ()),
        );
        r.map(Response::new)
    }

    async fn release_vm(
        &self,
        req: Request<pb::ReleaseVmRequest>,
    ) -> Result<Response<pb::ReleaseVmResponse>, Status> {
        let start = Instant::now();
        let peer = peer_of(&req);
        let audit_vm = req.get_ref().vm_id.clone();
        if let Err(s) = self.admit_peer("ReleaseVm", &peer, Need::Admin, start) {
            audit::record(&self.ctx.metrics, "ReleaseVm", &audit_vm, &peer, Err(&s));
            return Err(s);
        }
        let r = match vm_id(&req.get_ref().vm_id) {
            Ok(id) => {
                self.with_ctx(move |ctx| {
                    let (decision, log) = {
                        let mut core = ctx.lock();
                        (core.decide_release(&id), core.log())
                    };
                    let written = log.wait(&decision.ticket);
                    let cpus = ctx
                        .lock()
                        .finish_release(decision, written)
                        .map_err(status_of)?;
                    Ok(pb::ReleaseVmResponse {
                        released_cpus: cpus.to_vec(),
                    })
                })
                .await
            }
            Err(s) => Err(s),
        };
        self.observe("ReleaseVm", start, &r);
        audit::record(
            &self.ctx.metrics,
            "ReleaseVm",
            &audit_vm,
            &peer,
            r.as_ref().map(|_| ()),
        );
        r.map(Response::new)
    }

    async fn get_vm(
        &self,
        req: Request<pb::GetVmRequest>,
    ) -> Result<Response<pb::GetVmResponse>, Status> {
        let start = Instant::now();
        self.admit("GetVm", &req, Need::Read, start)?;
        let id = req.into_inner().vm_id;
        let r = self
            .with_core(move |core| {
                let view = known_vm(core, &id)?;
                let records = core.module_records();
                Ok(pb::GetVmResponse {
                    vm: Some(vm_pb(core, &view, &records)),
                })
            })
            .await;
        self.observe("GetVm", start, &r);
        r.map(Response::new)
    }

    async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let start = Instant::now();
        self.admit("ListVms", &req, Need::Read, start)?;
        let q = req.into_inner();
        let r = self
            .with_core(move |core| {
                let page_size = match q.page_size {
                    0 => 100,
                    n => n.min(1000),
                } as usize;
                let after = if q.page_token.is_empty() {
                    None
                } else {
                    Some(
                        q.page_token
                            .strip_prefix(PAGE_TOKEN_PREFIX)
                            .ok_or_else(|| invalid("page_token", "not a token from ListVms"))?
                            .to_string(),
                    )
                };
                let filter = q.filter.unwrap_or_default();
                let records = core.module_records();
                let matching: Vec<pb::Vm> = core
                    .views()
                    .iter()
                    .map(|v| vm_pb(core, v, &records))
                    .filter(|vm| {
                        (filter.confidential_classes.is_empty()
                            || filter.confidential_classes.contains(&vm.confidential_class))
                            && (filter.states.is_empty() || filter.states.contains(&vm.state))
                    })
                    .collect();
                let total = crate::cpuset::count_u32(matching.len());
                let page: Vec<pb::Vm> = matching
                    .into_iter()
                    .filter(|vm| {
                        after
                            .as_ref()
                            .is_none_or(|a| vm.vm_id.as_str() > a.as_str())
                    })
                    .take(page_size + 1)
                    .collect();
                let (vms, next) = if page.len() > page_size {
                    let mut vms = page;
                    vms.truncate(page_size);
                    let last = vms.last().map(|v| v.vm_id.clone()).unwrap_or_default();
                    (vms, format!("{PAGE_TOKEN_PREFIX}{last}"))
                } else {
                    (page, String::new())
                };
                Ok(pb::ListVmsResponse {
                    vms,
                    next_page_token: next,
                    total_size: total,
                })
            })
            .await;
        self.observe("ListVms", start, &r);
        r.map(Response::new)
    }

    async fn scrub_vm(
        &self,
        req: Request<pb::ScrubVmRequest>,
    ) -> Result<Response<pb::ScrubVmResponse>, Status> {
        let start = Instant::now();
        let peer = peer_of(&req);
        let audit_vm = req.get_ref().vm_id.clone();
        if let Err(s) = self.admit_peer("ScrubVm", &peer, Need::Admin, start) {
            audit::record(&self.ctx.metrics, "ScrubVm", &audit_vm, &peer, Err(&s));
            return Err(s);
        }
        let id = req.into_inner().vm_id;
        let r = self
            .with_core(move |core| {
                let done = core.scrub(&id).map_err(status_of)?;
                Ok(pb::ScrubVmResponse {
                    flushed_cpus: done.flushed_cpus.to_vec(),
                    duration: Some(sevplace_proto::pbjson_types::Duration {
                        seconds: done.took.as_secs() as i64,
                        nanos: done.took.subsec_nanos() as i32,
                    }),
                })
            })
            .await;
        self.observe("ScrubVm", start, &r);
        audit::record(
            &self.ctx.metrics,
            "ScrubVm",
            &audit_vm,
            &peer,
            r.as_ref().map(|_| ()),
        );
        r.map(Response::new)
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let start = Instant::now();
        self.admit("WatchEvents", &req, Need::Read, start)?;
        let only = req.into_inner().vm_id;
        let mut rx = self.ctx.events.subscribe();
        let stream = async_stream_events(move |tx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if !only.is_empty() && ev.vm_id != only {
                            continue;
                        }
                        let msg = pb::WatchEventsResponse {
                            event: Some(convert::event(&ev)),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "this watcher fell {n} events behind and was dropped; reconnect"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let r: Result<Response<EventStream>, Status> = Ok(Response::new(stream));
        self.observe("WatchEvents", start, &r);
        r
    }
}

/// A stream fed by a task through a small bounded channel; the task ends
/// when the client goes away.
fn async_stream_events<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchEventsResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests;
