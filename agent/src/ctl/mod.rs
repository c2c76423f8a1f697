//! `sevplacectl`: the command-line client. Commands print a human table by
//! default and one JSON document (protobuf JSON mapping) with `--json`.

pub(crate) mod fleet;
pub mod render;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sevplace_proto::v1 as pb;
use sevplace_proto::v1::sevplace_service_client::SevplaceServiceClient;
use tokio_stream::StreamExt;

use crate::api::convert;
use crate::client;
use crate::types::ConfidentialClass;

/// Command-line client of sevplaced. Connection options go before the
/// command: `sevplacectl --socket PATH host`.
#[derive(Parser, Debug)]
#[command(name = "sevplacectl", version)]
pub struct Cli {
    /// Unix socket of sevplaced (default: the daemon's default for this user).
    #[arg(long, value_name = "PATH", help_heading = "Connection")]
    pub(crate) socket: Option<PathBuf>,
    /// Call sevplaced over TCP at this address (host:port) instead of the
    /// Unix socket; needs --ca, --cert and --key (mutual TLS), or --insecure.
    #[arg(long, value_name = "ADDR", help_heading = "Connection")]
    pub(crate) tcp: Option<String>,
    /// With --tcp: PEM bundle of the CAs that sign the daemon's certificate.
    #[arg(long, value_name = "FILE", help_heading = "Connection")]
    pub(crate) ca: Option<PathBuf>,
    /// With --tcp: client certificate (PEM) whose name the daemon admits.
    #[arg(long, value_name = "FILE", help_heading = "Connection")]
    pub(crate) cert: Option<PathBuf>,
    /// With --tcp: private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", help_heading = "Connection")]
    pub(crate) key: Option<PathBuf>,
    /// With --tcp: the name the daemon's certificate must be valid for
    /// (default: the host part of ADDR).
    #[arg(long, value_name = "NAME", help_heading = "Connection")]
    pub(crate) server_name: Option<String>,
    /// With --tcp: plaintext TCP, for a daemon with server.insecure_tcp.
    #[arg(long, help_heading = "Connection")]
    pub(crate) insecure: bool,
    /// Print JSON instead of a table: one document, or one line per refresh
    /// (top) or event (watch); errors as one JSON object on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Host topology, pools, capacity and module status.
    Host,
    /// List VMs.
    Vms {
        /// Only this class (none, sev, sev-es, sev-snp); repeatable.
        #[arg(long = "class", value_name = "CLASS")]
        classes: Vec<ConfidentialClass>,
    },
    /// Show one VM.
    Vm {
        /// The VM's id (vm_id): the name given to place, or pid-<PID> for a
        /// discovered VM.
        id: String,
    },
    /// Place a VM (or, with --validate-only, show where it would go).
    Place {
        /// The id to give the VM (vm_id): letters, digits, '.', '_', '-'.
        id: String,
        /// PID of the VM's process.
        #[arg(long, value_name = "PID", allow_negative_numbers = true, value_parser = clap::value_parser!(u32))]
        pid: Option<u32>,
        /// libvirt domain name of the VM.
        #[arg(long, value_name = "NAME")]
        domain: Option<String>,
        /// Number of vCPUs (1 or more; the daemon refuses 0 as INVALID_ARGUMENT).
        #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(u32))]
        vcpus: u32,
        /// Confidential class (none, sev, sev-es, sev-snp); default: classify.
        #[arg(long, value_name = "CLASS")]
        confidential: Option<ConfidentialClass>,
        /// Overcommitted VM: float within the pool instead of dedicated cores.
        #[arg(long)]
        shared: bool,
        /// Preferred NUMA node.
        #[arg(long, value_name = "NODE", allow_negative_numbers = true)]
        numa: Option<u32>,
        /// Only compute the placement.
        #[arg(long)]
        validate_only: bool,
    },
    /// Release a VM's placement.
    Release {
        /// The VM's id (vm_id).
        id: String,
    },
    /// Flush the CPUs a VM dirtied since its last flush.
    Scrub {
        /// The VM's id (vm_id).
        id: String,
    },
    /// Replay a VM/reclaim trace on a topology through every placement and
    /// flush policy, or over a fleet through every fleet model; no daemon
    /// needed.
    Simulate {
        /// Trace file (JSON or YAML).
        #[arg(long, value_name = "FILE")]
        trace: PathBuf,
        /// A named topology (e.g. genoa-2x96-nps1) or a host root directory.
        #[arg(
            long,
            value_name = "NAME|DIR",
            required_unless_present = "fleet",
            conflicts_with = "fleet"
        )]
        topology: Option<String>,
        /// A fleet: a host count cycling over genoa-2x96-nps1, milan-64c,
        /// genoa-2x96-nps4, rome-64c (e.g. 1000), or TOPOLOGY:COUNT entries
        /// (e.g. genoa-2x96-nps1:600,milan-64c:400); docs/placement.md.
        #[arg(long, value_name = "HOSTS")]
        fleet: Option<String>,
    },
    /// The reference fleet scheduler: place and release VMs across hosts
    /// through OpenStack Placement, and show the fleet (docs/fleet.md).
    Fleet(fleet::FleetArgs),
    /// Live view of the host: VMs, pinned CPUs, dirty CPUs, flush rates.
    Top {
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (0: until interrupted).
        #[arg(long, value_name = "N", default_value_t = 0)]
        iterations: u64,
    },
    /// Stream events.
    Watch {
        /// Only events of this VM (its vm_id).
        #[arg(long, value_name = "ID")]
        vm: Option<String>,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The daemon could not be reached.
    #[error("{0}")]
    Connect(#[from] client::ConnectError),
    /// The daemon answered the call with an error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The simulation could not run.
    #[error("{0}")]
    Simulate(#[from] crate::simulate::SimError),
    /// The command line asks for something the command cannot do.
    #[error("{0}")]
    Usage(String),
    /// The answer could not be printed as JSON.
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A call to OpenStack Placement failed.
    #[error("Placement: {0}")]
    Fleet(#[from] crate::fleet::FleetError),
    /// The hosts file of `fleet` could not be read or holds a bad entry.
    #[error("{0}")]
    Hosts(String),
    /// No host of the fleet has room for the VM.
    #[error("{0}")]
    NoRoom(String),
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}

impl CtlError {
    /// A short name of the failure for `--json` errors: the gRPC code of an
    /// RPC error, else `connect`, `simulate`, `usage`, `json`, `placement`,
    /// `hosts` or `no-room`.
    pub(crate) fn code(&self) -> String {
        match self {
            CtlError::Connect(_) => "connect".into(),
            CtlError::Rpc(s) => code_name(s.code()),
            CtlError::Simulate(_) => "simulate".into(),
            CtlError::Usage(_) => "usage".into(),
            CtlError::Json(_) => "json".into(),
            CtlError::Fleet(_) => "placement".into(),
            CtlError::Hosts(_) => "hosts".into(),
            CtlError::NoRoom(_) => "no-room".into(),
        }
    }

    /// The error as one JSON object, for stderr with `--json`:
    /// `{"error":{"code":"NotFound","message":"..."}}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}}).to_string()
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CtlError> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Every VM, following ListVms pages.
async fn list_all(
    c: &mut sevplace_proto::v1::sevplace_service_client::SevplaceServiceClient<
        tonic::transport::Channel,
    >,
    classes: Vec<ConfidentialClass>,
) -> Result<Vec<pb::Vm>, CtlError> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_vms(pb::ListVmsRequest {
                page_size: 500,
                page_token: token.clone(),
                filter: Some(pb::ListVmsFilter {
                    confidential_classes: classes
                        .iter()
                        .map(|&k| convert::class_to_pb(k) as i32)
                        .collect(),
                    states: Vec::new(),
                }),
            })
            .await?
            .into_inner();
        all.extend(r.vms);
        if r.next_page_token.is_empty() {
            return Ok(all);
        }
        token = r.next_page_token;
    }
}

/// The channel the transport flags ask for: the Unix socket by default,
/// mutual TLS with `--tcp --ca --cert --key`, plaintext TCP with `--tcp
/// --insecure`.
async fn channel(cli: &Cli) -> Result<tonic::transport::Channel, CtlError> {
    let tls_flags = cli.ca.is_some() || cli.cert.is_some() || cli.key.is_some();
    let Some(addr) = &cli.tcp else {
        if tls_flags || cli.server_name.is_some() || cli.insecure {
            return Err(CtlError::Usage(
                "--ca, --cert, --key, --server-name and --insecure need --tcp".into(),
            ));
        }
        let socket = cli
            .socket
            .clone()
            .unwrap_or_else(crate::config::default_socket);
        return Ok(client::channel(&socket).await?);
    };
    if cli.socket.is_some() {
        return Err(CtlError::Usage(
            "--socket and --tcp exclude each other".into(),
        ));
    }
    if cli.insecure {
        if tls_flags || cli.server_name.is_some() {
            return Err(CtlError::Usage(
                "--insecure excludes --ca, --cert, --key and --server-name".into(),
            ));
        }
        return Ok(client::channel_tcp(addr).await?);
    }
    match (&cli.ca, &cli.cert, &cli.key) {
        (Some(ca), Some(cert), Some(key)) => {
            let config = crate::tls::client_config(ca, cert, key).map_err(client::ConnectError::from)?;
            Ok(client::channel_tls(addr, cli.server_name.as_deref(), config).await?)
        }
        _ => Err(CtlError::Usage(
            "--tcp needs --ca, --cert and --key (mutual TLS), or --insecure for a daemon with server.insecure_tcp".into(),
        )),
    }
}

/// Runs one command against the daemon.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    if let Command::Simulate {
        trace,
        topology,
        fleet,
    } = &cli.command
    {
        let out = match (topology, fleet) {
            (Some(topology), None) => crate::simulate::run_simulate_cli(trace, topology, cli.json)?,
            (None, Some(fleet)) => crate::simulate::run_fleet_simulate_cli(trace, fleet, cli.json)?,
            _ => {
                return Err(CtlError::Usage(
                    "simulate takes one of --topology and --fleet".into(),
                ))
            }
        };
        print!("{out}");
        return Ok(());
    }
    let json = cli.json;
    let command = match cli.command {
        Command::Fleet(args) => return fleet::run(args, json).await,
        other => other,
    };
    let cli = Cli { command, ..cli };
    let mut c = SevplaceServiceClient::new(channel(&cli).await?);
    match cli.command {
        Command::Host => {
            let r = c.get_host(pb::GetHostRequest {}).await?.into_inner();
            if cli.json {
                print_json(&r)?;
            } else if let Some(h) = &r.host {
                print!("{}", render::host(h));
            }
        }
        Command::Vms { classes } => {
            let all = list_all(&mut c, classes).await?;
            if cli.json {
                print_json(&pb::ListVmsResponse {
                    total_size: crate::cpuset::count_u32(all.len()),
                    vms: all,
                    next_page_token: String::new(),
                })?;
            } else {
                print!("{}", render::vms(&all));
            }
        }
        Command::Vm { id } => {
            let r = c.get_vm(pb::GetVmRequest { vm_id: id }).await?.into_inner();
            if cli.json {
                print_json(&r)?;
            } else if let Some(vm) = &r.vm {
                print!("{}", render::vm(vm));
            }
        }
        Command::Place {
            id,
            pid,
            domain,
            vcpus,
            confidential,
            shared,
            numa,
            validate_only,
        } => {
            let selector = match (pid, domain) {
                (Some(p), _) => Some(pb::vm_selector::Selector::Pid(p)),
                (None, Some(d)) => Some(pb::vm_selector::Selector::LibvirtDomain(d)),
                (None, None) => None,
            };
            let r = c
                .place_vm(pb::PlaceVmRequest {
                    vm_id: id,
                    selector: selector.map(|s| pb::VmSelector { selector: Some(s) }),
                    vcpus,
                    confidential_class: confidential
                        .map_or(pb::ConfidentialClass::Unspecified, convert::class_to_pb)
                        as i32,
                    shared,
                    numa_node: numa,
                    validate_only,
                    placement_consumer: None,
                })
                .await?
                .into_inner();
            if cli.json {
                print_json(&r)?;
            } else if let Some(vm) = &r.vm {
                if r.validated_only {
                    println!("validate only: nothing changed");
                }
                print!("{}", render::vm(vm));
            }
        }
        Command::Release { id } => {
            let r = c
                .release_vm(pb::ReleaseVmRequest { vm_id: id.clone() })
                .await?
                .into_inner();
            if cli.json {
                print_json(&r)?;
            } else {
                println!("released {id}: CPUs {}", render::cpulist(&r.released_cpus));
            }
        }
        Command::Scrub { id } => {
            let r = c
                .scrub_vm(pb::ScrubVmRequest { vm_id: id.clone() })
                .await?
                .into_inner();
            if cli.json {
                print_json(&r)?;
            } else {
                let us = r
                    .duration
                    .map_or(0, |d| d.seconds * 1_000_000 + i64::from(d.nanos) / 1000);
                println!(
                    "scrubbed {id}: flushed CPUs {} in {us} µs",
                    render::cpulist(&r.flushed_cpus)
                );
            }
        }
        Command::Simulate { .. } | Command::Fleet(_) => {}
        Command::Top {
            interval,
            iterations,
        } => {
            if !(0.05..=3600.0).contains(&interval) {
                return Err(CtlError::Usage(
                    "--interval must be between 0.05 and 3600 seconds".into(),
                ));
            }
            let mut prev: Option<(std::time::Instant, Vec<pb::Vm>)> = None;
            let mut n = 0u64;
            loop {
                let host = c
                    .get_host(pb::GetHostRequest {})
                    .await?
                    .into_inner()
                    .host
                    .unwrap_or_default();
                let vms = list_all(&mut c, Vec::new()).await?;
                let now = std::time::Instant::now();
                let rows = render::top_rows(
                    &vms,
                    prev.as_ref()
                        .map(|(t, v)| (now.duration_since(*t), v.as_slice())),
                );
                if cli.json {
                    println!("{}", serde_json::to_string(&rows)?);
                } else if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    // Clear the screen and home the cursor, then redraw.
                    print!("\x1b[H\x1b[2J{}", render::top(&host, &rows));
                } else {
                    // Piped: one screen after another, a blank line apart.
                    if n > 0 {
                        println!();
                    }
                    print!("{}", render::top(&host, &rows));
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
                prev = Some((now, vms));
                n += 1;
                if iterations != 0 && n >= iterations {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs_f64(interval)).await;
            }
        }
        Command::Watch { vm } => {
            let mut stream = c
                .watch_events(pb::WatchEventsRequest {
                    vm_id: vm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if !cli.json {
                println!("{}", render::EVENT_HEADER);
            }
            while let Some(ev) = stream.next().await {
                let ev = ev?;
                if cli.json {
                    println!("{}", serde_json::to_string(&ev)?);
                } else if let Some(e) = &ev.event {
                    println!("{}", render::event(e));
                }
            }
        }
    }
    Ok(())
}
