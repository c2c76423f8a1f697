//! `sevplacectl fleet`: the reference fleet scheduler. It asks OpenStack
//! Placement for candidates in the agent's own preference order
//! (`fleet::scheduler`), claims the best fit, and calls PlaceVm with the
//! claim's consumer on the chosen host's sevplaced; on a 409 or a refusal it
//! releases the claim and takes the next candidate. docs/fleet.md walks
//! through the REST calls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use sevplace_proto::v1 as pb;
use sevplace_proto::v1::sevplace_service_client::SevplaceServiceClient;
use tonic::transport::Channel;

use super::CtlError;
use crate::api::convert;
use crate::client;
use crate::fleet::scheduler::{self, FleetAsk};
use crate::fleet::tree::{MANAGED_TRAIT, PCPU_CLASS, POOL_CONFIDENTIAL, POOL_EMPTY, POOL_GENERAL};
use crate::fleet::{FleetAuth, FleetError, PlacementClient};
use crate::types::ConfidentialClass;

/// How many times a stage is queried again after every candidate of its
/// answer was taken by someone else (409) meanwhile.
const REQUERIES: usize = 3;

/// Where Placement is and where each host's sevplaced listens.
#[derive(Args, Debug)]
pub(crate) struct FleetArgs {
    /// Placement endpoint, e.g. http://placement.example:8778.
    #[arg(long, value_name = "URL")]
    pub(crate) placement_url: String,
    /// File holding the Keystone token sent as X-Auth-Token.
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: PathBuf,
    /// TOML file mapping host names to their sevplaced (docs/fleet.md).
    #[arg(long, value_name = "FILE")]
    pub(crate) hosts: PathBuf,
    /// Timeout of each Placement call, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub(crate) timeout: u64,
    #[command(subcommand)]
    pub(crate) command: FleetCommand,
}

#[derive(Subcommand, Debug)]
pub(crate) enum FleetCommand {
    /// Choose a host through Placement, claim, and place the VM there.
    Place {
        /// The VM's id (vm_id) on its host.
        id: String,
        /// Number of vCPUs.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        vcpus: u32,
        /// Confidential class: none, sev, sev-es, sev-snp.
        #[arg(long, value_name = "CLASS")]
        confidential: ConfidentialClass,
        /// Overcommitted VM: floats within its pool's domains.
        #[arg(long)]
        shared: bool,
        /// libvirt domain name of the VM on the chosen host, if it runs
        /// already; without it the agent waits for the VM to appear.
        #[arg(long, value_name = "NAME")]
        domain: Option<String>,
        /// Consumer UUID of the claim (default: derived from the id).
        #[arg(long, value_name = "UUID")]
        consumer: Option<String>,
        /// Project of the claim.
        #[arg(long, value_name = "ID", default_value = "sevplace")]
        project: String,
        /// User of the claim.
        #[arg(long, value_name = "ID", default_value = "sevplace")]
        user: String,
    },
    /// Release a VM on its host and delete its claim.
    Release {
        /// The VM's id (vm_id).
        id: String,
        /// Consumer UUID of the claim (default: derived from the id).
        #[arg(long, value_name = "UUID")]
        consumer: Option<String>,
    },
    /// Hosts, free CPUs per pool, confidential domains in use, hosts whose
    /// sync is failing.
    Status,
}

/// How to reach one host's sevplaced.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HostAddress {
    /// Unix socket (an agent on this machine).
    pub(crate) socket: Option<PathBuf>,
    /// `host:port` of the agent's TCP listener (mutual TLS).
    pub(crate) tcp: Option<String>,
    /// Name the agent's certificate is valid for (default: the host part of
    /// `tcp`).
    pub(crate) server_name: Option<String>,
}

/// The hosts file: TLS material for every TCP host, and the hosts by the
/// name they report to Placement as.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HostsFile {
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    #[serde(default)]
    pub(crate) hosts: BTreeMap<String, HostAddress>,
}

impl HostsFile {
    /// Reads and checks `path`: every host has exactly one of `socket` and
    /// `tcp`, and TCP hosts have the TLS material.
    pub(crate) fn load(path: &Path) -> Result<Self, CtlError> {
        let bad = |m: String| CtlError::Hosts(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: HostsFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        for (name, h) in &file.hosts {
            match (&h.socket, &h.tcp) {
                (Some(_), None) => {}
                (None, Some(_)) => {
                    if file.ca.is_none() || file.cert.is_none() || file.key.is_none() {
                        return Err(bad(format!(
                            "host {name} is reached over TCP: ca, cert and key are needed"
                        )));
                    }
                }
                _ => return Err(bad(format!("host {name}: exactly one of socket and tcp"))),
            }
        }
        Ok(file)
    }

    async fn connect(&self, host: &str) -> Result<SevplaceServiceClient<Channel>, CtlError> {
        let h = self
            .hosts
            .get(host)
            .ok_or_else(|| CtlError::Hosts(format!("host {host} is not in the hosts file")))?;
        let channel = match (&h.socket, &h.tcp, &self.ca, &self.cert, &self.key) {
            (Some(s), _, _, _, _) => client::channel(s).await?,
            (None, Some(addr), Some(ca), Some(cert), Some(key)) => {
                let config =
                    crate::tls::client_config(ca, cert, key).map_err(client::ConnectError::from)?;
                client::channel_tls(addr, h.server_name.as_deref(), config).await?
            }
            _ => return Err(CtlError::Hosts(format!("host {host} has no address"))),
        };
        Ok(SevplaceServiceClient::new(channel))
    }
}

/// Whether a PlaceVm refusal is the host's (another candidate may take the
/// VM) rather than the request's.
fn host_refused(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Internal
    )
}

/// Whether a failed PlaceVm may still have been carried out (the call
/// broke on the way, not refused).
fn outcome_unknown(e: &CtlError) -> bool {
    use tonic::Code;
    match e {
        CtlError::Rpc(s) => matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        ),
        _ => false,
    }
}

/// How long a release of a VM whose placement outcome is unknown waits for
/// its host's agent to answer (an agent restarting after a crash).
const UNKNOWN_OUTCOME_WAIT: Duration = Duration::from_secs(30);

/// Releases `id` on `host`, retrying while the agent is unreachable, up to
/// [`UNKNOWN_OUTCOME_WAIT`]. NOT_FOUND (never placed) is success.
async fn release_on(hosts: &HostsFile, host: &str, id: &str) -> Result<(), CtlError> {
    let deadline = std::time::Instant::now() + UNKNOWN_OUTCOME_WAIT;
    loop {
        let result = match hosts.connect(host).await {
            Ok(mut c) => c
                .release_vm(pb::ReleaseVmRequest {
                    vm_id: id.to_string(),
                })
                .await
                .map(|_| ())
                .map_err(CtlError::from),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(CtlError::Rpc(s)) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(CtlError::Hosts(format!(
                    "{host}: the outcome of placing {id} is unknown and the agent does not answer: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Names of providers by UUID, read once each.
struct ProviderNames<'a> {
    placement: &'a PlacementClient,
    names: BTreeMap<String, String>,
}

impl ProviderNames<'_> {
    fn name(&mut self, uuid: &str) -> Result<String, FleetError> {
        if let Some(n) = self.names.get(uuid) {
            return Ok(n.clone());
        }
        let rp = self.placement.get(&format!("/resource_providers/{uuid}"))?;
        let n = rp["name"].as_str().unwrap_or("").to_string();
        self.names.insert(uuid.to_string(), n.clone());
        Ok(n)
    }

    /// The host of the L3 providers `uuids` (all of one host).
    fn host(&mut self, uuids: &[String]) -> Result<Option<String>, FleetError> {
        for u in uuids {
            let n = self.name(u)?;
            if let Some(h) = scheduler::host_of_l3(&n) {
                return Ok(Some(h.to_string()));
            }
        }
        Ok(None)
    }
}

/// The L3 providers (`CUSTOM_SEVPLACE_PCPU`) a consumer holds.
fn held_l3(allocations: &Value) -> Vec<String> {
    allocations["allocations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, a)| a["resources"][PCPU_CLASS].as_u64().unwrap_or(0) > 0)
                .map(|(rp, _)| rp.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a `fleet` command.
pub(crate) async fn run(args: FleetArgs, json_out: bool) -> Result<(), CtlError> {
    let hosts = HostsFile::load(&args.hosts)?;
    let placement = PlacementClient::new(
        &args.placement_url,
        FleetAuth::TokenFile(args.token_file.clone()),
        Duration::from_secs(args.timeout.max(1)),
    );
    match args.command {
        FleetCommand::Place {
            id,
            vcpus,
            confidential,
            shared,
            domain,
            consumer,
            project,
            user,
        } => {
            let consumer = checked_consumer(consumer, &id, &project, &user)?;
            let placed = place(
                &placement,
                &hosts,
                &PlaceAsk {
                    id: &id,
                    ask: FleetAsk {
                        vcpus,
                        class: confidential,
                    },
                    shared,
                    domain,
                    consumer,
                },
            )
            .await?;
            if json_out {
                super::print_json(&placed)?;
            } else {
                println!(
                    "placed {id} on {} ({}, consumer {}): CPUs {}",
                    placed["host"].as_str().unwrap_or(""),
                    placed["stage"].as_str().unwrap_or(""),
                    placed["consumer"].as_str().unwrap_or(""),
                    placed["cpus"].as_str().unwrap_or("")
                );
            }
        }
        FleetCommand::Release { id, consumer } => {
            let consumer = checked_consumer(consumer, &id, "sevplace", "sevplace")?;
            let released = release(&placement, &hosts, &id, &consumer.uuid).await?;
            if json_out {
                super::print_json(&released)?;
            } else {
                let on: Vec<&str> = released["hosts"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                println!(
                    "released {id} (consumer {}) on {}",
                    consumer.uuid,
                    if on.is_empty() {
                        "no host".to_string()
                    } else {
                        on.join(", ")
                    }
                );
            }
        }
        FleetCommand::Status => {
            let s = status(&placement, &hosts).await?;
            if json_out {
                super::print_json(&s)?;
            } else {
                print!("{}", render_status(&s));
            }
        }
    }
    Ok(())
}

fn checked_consumer(
    uuid: Option<String>,
    id: &str,
    project: &str,
    user: &str,
) -> Result<crate::fleet::Consumer, CtlError> {
    let uuid = uuid.unwrap_or_else(|| scheduler::consumer_uuid(id));
    crate::fleet::consumer_from_parts(&uuid, project, user)
        .map_err(|(field, why)| CtlError::Usage(format!("{field}: {why}")))
}

struct PlaceAsk<'a> {
    id: &'a str,
    ask: FleetAsk,
    shared: bool,
    domain: Option<String>,
    consumer: crate::fleet::Consumer,
}

async fn place_on(
    hosts: &HostsFile,
    host: &str,
    req: &PlaceAsk<'_>,
) -> Result<pb::PlaceVmResponse, CtlError> {
    let mut c = hosts.connect(host).await?;
    let r = c
        .place_vm(pb::PlaceVmRequest {
            vm_id: req.id.to_string(),
            selector: req.domain.clone().map(|d| pb::VmSelector {
                selector: Some(pb::vm_selector::Selector::LibvirtDomain(d)),
            }),
            vcpus: req.ask.vcpus,
            confidential_class: convert::class_to_pb(req.ask.class) as i32,
            shared: req.shared,
            numa_node: None,
            validate_only: false,
            placement_consumer: Some(pb::PlacementConsumer {
                uuid: req.consumer.uuid.clone(),
                project_id: req.consumer.project_id.clone(),
                user_id: req.consumer.user_id.clone(),
            }),
        })
        .await?;
    Ok(r.into_inner())
}

fn placed_json(host: &str, stage: &str, consumer: &str, r: &pb::PlaceVmResponse) -> Value {
    let cpus =
        r.vm.as_ref()
            .and_then(|v| v.placement.as_ref())
            .map(|p| super::render::cpulist(&p.cpus))
            .unwrap_or_default();
    json!({"host": host, "stage": stage, "consumer": consumer, "cpus": cpus})
}

/// Claims and places; returns `{"host", "stage", "consumer", "cpus"}`.
async fn place(
    placement: &PlacementClient,
    hosts: &HostsFile,
    req: &PlaceAsk<'_>,
) -> Result<Value, CtlError> {
    let uuid = req.consumer.uuid.as_str();
    let mut names = ProviderNames {
        placement,
        names: BTreeMap::new(),
    };
    // A retry of a place that claimed already: the claim names the host.
    let held = held_l3(&placement.get(&format!("/allocations/{uuid}"))?);
    if let Some(host) = names.host(&held)? {
        let r = place_on(hosts, &host, req).await?;
        return Ok(placed_json(&host, "retry", uuid, &r));
    }
    let mut tried: Vec<String> = Vec::new();
    for q in scheduler::queries(req.ask) {
        for _ in 0..REQUERIES {
            let path = format!("/allocation_candidates?{}", q.query);
            let answer = placement.get(&path)?;
            let candidates = scheduler::rank(&answer).map_err(|e| FleetError::Body {
                method: "GET",
                path,
                reason: e.0,
            })?;
            if candidates.is_empty() {
                break;
            }
            let mut raced = false;
            for cand in &candidates {
                let Some(host) = names.host(&cand.l3)? else {
                    continue;
                };
                if !hosts.hosts.contains_key(&host) {
                    tried.push(format!("{host}: not in the hosts file"));
                    continue;
                }
                let body =
                    scheduler::claim_body(cand, &req.consumer.project_id, &req.consumer.user_id);
                match placement.put(&format!("/allocations/{uuid}"), &body) {
                    Ok(_) => {}
                    Err(e) if e.is_conflict() => {
                        raced = true;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                match place_on(hosts, &host, req).await {
                    Ok(r) => return Ok(placed_json(&host, &q.stage.to_string(), uuid, &r)),
                    Err(e) => {
                        if outcome_unknown(&e) {
                            // The host may have placed the VM before the
                            // call broke: undo it there before the claim
                            // goes, or the VM would run on two hosts.
                            release_on(hosts, &host, req.id).await?;
                        }
                        placement.delete(&format!("/allocations/{uuid}"))?;
                        match &e {
                            CtlError::Rpc(s) if host_refused(s) => {
                                tried.push(format!("{host}: {e}"));
                            }
                            CtlError::Connect(_) => tried.push(format!("{host}: {e}")),
                            _ => return Err(e),
                        }
                    }
                }
            }
            if !raced {
                break;
            }
        }
    }
    Err(CtlError::NoRoom(format!(
        "no host takes {} ({} vCPUs, {}){}",
        req.id,
        req.ask.vcpus,
        req.ask.class,
        if tried.is_empty() {
            String::new()
        } else {
            format!("; refused by {}", tried.join("; "))
        }
    )))
}

/// Releases `id` on the hosts that hold it, then deletes the claim.
async fn release(
    placement: &PlacementClient,
    hosts: &HostsFile,
    id: &str,
    uuid: &str,
) -> Result<Value, CtlError> {
    let mut names = ProviderNames {
        placement,
        names: BTreeMap::new(),
    };
    let held = held_l3(&placement.get(&format!("/allocations/{uuid}"))?);
    let mut on: BTreeSet<String> = BTreeSet::new();
    if let Some(h) = names.host(&held)? {
        on.insert(h);
    } else {
        // No claim on L3 providers (a shared VM, or a claim the host could
        // not publish): ask every host.
        for h in hosts.hosts.keys() {
            let Ok(mut c) = hosts.connect(h).await else {
                continue;
            };
            if c.get_vm(pb::GetVmRequest {
                vm_id: id.to_string(),
            })
            .await
            .is_ok()
            {
                on.insert(h.clone());
            }
        }
    }
    let mut released = Vec::new();
    for h in &on {
        let mut c = hosts.connect(h).await?;
        match c
            .release_vm(pb::ReleaseVmRequest {
                vm_id: id.to_string(),
            })
            .await
        {
            Ok(_) => released.push(h.clone()),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(s.into()),
        }
    }
    placement.delete(&format!("/allocations/{uuid}"))?;
    Ok(json!({"vm_id": id, "consumer": uuid, "hosts": released}))
}

/// One L3 provider as Placement holds it.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct DomainView {
    total: u64,
    reserved: u64,
    used: u64,
    pool: &'static str,
}

/// `{"hosts": [{"host", "domains", "confidential_domains", "free":
/// {"confidential", "general", "empty"}, "agent"}]}`.
async fn status(placement: &PlacementClient, hosts: &HostsFile) -> Result<Value, CtlError> {
    let roots = placement.get(&format!("/resource_providers?required={MANAGED_TRAIT}"))?;
    let mut by_host: BTreeMap<String, Vec<DomainView>> = BTreeMap::new();
    for root in roots["resource_providers"].as_array().into_iter().flatten() {
        let Some(root_uuid) = root["uuid"].as_str() else {
            continue;
        };
        let tree = placement.get(&format!("/resource_providers?in_tree={root_uuid}"))?;
        for rp in tree["resource_providers"].as_array().into_iter().flatten() {
            let (Some(name), Some(uuid)) = (rp["name"].as_str(), rp["uuid"].as_str()) else {
                continue;
            };
            let Some(host) = scheduler::host_of_l3(name) else {
                continue;
            };
            let inv = placement.get(&format!("/resource_providers/{uuid}/inventories"))?;
            let usages = placement.get(&format!("/resource_providers/{uuid}/usages"))?;
            let traits = placement.get(&format!("/resource_providers/{uuid}/traits"))?;
            let has = |t: &str| {
                traits["traits"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(t)))
            };
            let pcpu = &inv["inventories"][PCPU_CLASS];
            by_host
                .entry(host.to_string())
                .or_default()
                .push(DomainView {
                    total: pcpu["total"].as_u64().unwrap_or(0),
                    reserved: pcpu["reserved"].as_u64().unwrap_or(0),
                    used: usages["usages"][PCPU_CLASS].as_u64().unwrap_or(0),
                    pool: if has(POOL_CONFIDENTIAL) {
                        "confidential"
                    } else if has(POOL_GENERAL) {
                        "general"
                    } else if has(POOL_EMPTY) {
                        "empty"
                    } else {
                        "unknown"
                    },
                });
        }
    }
    let mut out = Vec::new();
    let names: BTreeSet<String> = by_host.keys().chain(hosts.hosts.keys()).cloned().collect();
    for host in names {
        let domains = by_host.get(&host).cloned().unwrap_or_default();
        let mut free: BTreeMap<&str, u64> =
            BTreeMap::from([("confidential", 0), ("general", 0), ("empty", 0)]);
        for d in &domains {
            *free.entry(d.pool).or_default() += d.total.saturating_sub(d.reserved + d.used);
        }
        let agent = if hosts.hosts.contains_key(&host) {
            match hosts.connect(&host).await {
                Ok(mut c) => match c.get_host(pb::GetHostRequest {}).await {
                    Ok(r) => {
                        let failing = r.into_inner().host.is_some_and(|h| {
                            h.conditions
                                .iter()
                                .any(|c| c.r#type == pb::ConditionType::FleetSyncFailing as i32)
                        });
                        if failing {
                            "sync-failing"
                        } else {
                            "ok"
                        }
                    }
                    Err(_) => "unreachable",
                },
                Err(_) => "unreachable",
            }
        } else {
            "unknown"
        };
        out.push(json!({
            "host": host,
            "domains": domains.len(),
            "confidential_domains": domains.iter().filter(|d| d.pool == "confidential").count(),
            "free": free,
            "agent": agent,
        }));
    }
    Ok(json!({"hosts": out}))
}

fn render_status(s: &Value) -> String {
    let mut out = format!(
        "{:<24} {:>7} {:>12} {:>10} {:>10} {:>10}  {}\n",
        "HOST", "DOMAINS", "CONF-IN-USE", "FREE-CONF", "FREE-GEN", "FREE-EMPTY", "AGENT"
    );
    for h in s["hosts"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<24} {:>7} {:>12} {:>10} {:>10} {:>10}  {}\n",
            h["host"].as_str().unwrap_or(""),
            h["domains"],
            h["confidential_domains"],
            h["free"]["confidential"],
            h["free"]["general"],
            h["free"]["empty"],
            h["agent"].as_str().unwrap_or("")
        ));
    }
    out
}
