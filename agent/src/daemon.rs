//! `sevplaced`: builds every part from the settings and runs until SIGTERM
//! or SIGINT.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sevplace_proto::v1::sevplace_service_server::SevplaceServiceServer;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::access::AccessPolicy;
use crate::api::SevplaceApi;
use crate::cgroup::CpusetWriter;
use crate::cgroup::SchedAffinity;
use crate::config::Settings;
use crate::discovery::pidfd::VmExitWatch;
use crate::discovery::VmScanner;
use crate::kmod::ModuleReader;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::placement::Reservations;
use crate::reconcile::events::EventBus;
use crate::reconcile::priority::PriorityMutex;
use crate::reconcile::{AgentContext, AgentCore, AgentError, HostAccess};
use crate::server::{self, ListenError, OwnedSocket};
use crate::state::CheckpointStore;
use crate::topology::{Topology, TopologyError};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The host topology could not be read from sysfs.
    #[error("host topology: {0}")]
    Topology(#[from] TopologyError),
    /// A listener (socket, TCP, metrics) could not be set up.
    #[error("{0}")]
    Listen(#[from] ListenError),
    /// `placement.reserved_cpus` names CPUs that are not online.
    #[error("reserved CPUs {reserved} are not all online (online: {online})")]
    Reserved {
        /// The reserved CPUs, as a cpulist.
        reserved: String,
        /// The online CPUs, as a cpulist.
        online: String,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The agent's core failed to load or to start.
    #[error("{0}")]
    Core(#[from] AgentError),
    /// The checkpoint could not be read or moved aside at start: the file,
    /// the cause, and what to do.
    #[error("cannot start: {source}; {fix}")]
    Checkpoint {
        /// What reading or moving the checkpoint returned.
        source: crate::state::CheckpointError,
        /// What the operator can do.
        fix: String,
    },
    /// The state directory cannot be created or written.
    #[error("cannot start: state directory {}: {what}: {source}; {fix}", dir.display())]
    StateDir {
        /// The state directory.
        dir: std::path::PathBuf,
        /// The step that failed (create, write).
        what: &'static str,
        /// What the step returned.
        source: std::io::Error,
        /// What the operator can do.
        fix: String,
    },
    /// A group named in the access settings does not exist.
    #[error("{0}")]
    Access(#[from] crate::access::UnknownGroup),
    /// The reconcile thread could not be started.
    #[error("reconcile thread: {0}")]
    ReconcileThread(std::io::Error),
    /// The SIGTERM or SIGINT handler could not be installed.
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    /// The mutual TLS files of the TCP listener could not be loaded.
    #[error("TCP mutual TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The fleet consumer store could not be read.
    #[error("fleet: {0}; to start anyway, move the file aside")]
    FleetStore(#[from] crate::fleet::ConsumerStoreError),
    /// The fleet reporter thread could not be started.
    #[error("fleet reporter thread: {0}")]
    FleetThread(std::io::Error),
}

/// What to do about a checkpoint that stops the start, for a user who runs
/// as `uid`.
fn checkpoint_fix(e: &crate::state::CheckpointError, dir: &std::path::Path, uid: u32) -> String {
    use crate::state::CheckpointError;
    match e {
        CheckpointError::Corrupt { .. } | CheckpointError::NewerVersion { .. } => {
            "run sevplaced --reset-state once to move it aside".into()
        }
        CheckpointError::Io { source, .. } => state_dir_fix(source, dir, uid),
    }
}

/// What to do about an I/O error on the state directory `dir`.
fn state_dir_fix(e: &std::io::Error, dir: &std::path::Path, uid: u32) -> String {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        format!(
            "uid {uid} may not use {}: run sevplaced as its owner (root for /var/lib/sevplace), \
             or point --state-dir (state.dir) at a directory uid {uid} owns \
             (the default for a non-root user is ~/.local/state/sevplace)",
            dir.display()
        )
    } else {
        format!(
            "make {} a writable directory, or point --state-dir (state.dir) at another one",
            dir.display()
        )
    }
}

/// Creates the state directory (0700) when missing and checks that this
/// process may write it, so a bad directory stops the start instead of the
/// first PlaceVm.
fn prepare_state_dir(dir: &std::path::Path) -> Result<(), DaemonError> {
    let uid = nix::unistd::Uid::effective().as_raw();
    let fail = |what, source: std::io::Error| DaemonError::StateDir {
        dir: dir.to_path_buf(),
        what,
        fix: state_dir_fix(&source, dir, uid),
        source,
    };
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail("cannot create", e))?;
    }
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|e| fail("cannot write", e.into()))
}

/// The bound address of a TCP listener for a log line (`127.0.0.1:9478`).
fn local_addr(l: &tokio::net::TcpListener) -> String {
    l.local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string())
}

/// How long in-flight calls may run after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    Ok(())
}

/// Start-up choices that are not settings.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Move a checkpoint that cannot be loaded aside and start without
    /// intents.
    pub reset_state: bool,
}

/// Milliseconds on the monotonic clock (from the process's first use of
/// it) at the end of the last reconcile pass, read by the watchdog feeder:
/// a stuck loop stops the feed and systemd restarts the agent. The wall
/// clock plays no part, so setting it forward or back neither stops the
/// feed nor hides a stuck loop.
static LAST_PASS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn monotonic_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let ms = ORIGIN.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Notices topology changes at run time (CPU hotplug, SMT toggled) for
/// the cost of one small read per pass: `devices/system/cpu/online`. When
/// its text changes, the whole topology is read again and handed to the
/// core, which checks every placement against it.
pub(crate) struct TopologyProbe {
    sysfs: std::path::PathBuf,
    online: Option<String>,
    reserved: usize,
}

impl TopologyProbe {
    pub(crate) fn new(sysfs: std::path::PathBuf, reserved: usize) -> Self {
        let online = std::fs::read_to_string(sysfs.join("devices/system/cpu/online")).ok();
        Self {
            sysfs,
            online,
            reserved,
        }
    }

    /// Re-reads the topology when the online CPUs changed since the last
    /// check; a read that fails is logged and tried again next pass.
    pub(crate) fn check(&mut self, ctx: &AgentContext) {
        let now = std::fs::read_to_string(self.sysfs.join("devices/system/cpu/online")).ok();
        if now.is_none() || now == self.online {
            return;
        }
        match Topology::from_sysfs(&self.sysfs) {
            Ok(topology) => {
                self.online = now;
                ctx.metrics.set_topology(&topology, self.reserved);
                ctx.lock_first().set_topology(Arc::new(topology));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the online CPUs changed but the topology cannot be read; retried next pass")
            }
        }
    }
}

/// One reconcile pass ([`crate::reconcile::run_pass`]), recorded for the
/// watchdog.
pub(crate) fn reconcile_pass(ctx: &AgentContext) {
    crate::reconcile::run_pass(ctx);
    LAST_PASS.store(monotonic_ms(), std::sync::atomic::Ordering::Relaxed);
}

/// Feeds the systemd watchdog while reconcile passes keep finishing.
async fn watchdog_feeder(
    notifier: Notifier,
    every: Duration,
    stale_after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        let stopping = tokio::select! {
            _ = stop.wait_for(|s| *s) => true,
            _ = tick.tick() => false,
        };
        if stopping {
            return;
        }
        let age =
            monotonic_ms().saturating_sub(LAST_PASS.load(std::sync::atomic::Ordering::Relaxed));
        if Duration::from_millis(age) <= stale_after {
            notifier.watchdog_ping();
        } else {
            tracing::error!(
                age_ms = age,
                "reconcile loop stalled; not feeding the watchdog"
            );
        }
    }
}

/// The reconcile loop: one pass per period, and one right away when a
/// watched VM process exits (pidfd readiness).
async fn reconcile_loop(
    ctx: Arc<AgentContext>,
    period: Duration,
    exit_watches: bool,
    mut probe: TopologyProbe,
    mut stop: watch::Receiver<bool>,
) {
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut watched: HashSet<(u32, u64)> = HashSet::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        if exit_watches {
            watch_exits(&ctx, &wake, &mut watched);
        }
        let stopping = tokio::select! {
            _ = stop.wait_for(|s| *s) => true,
            _ = tick.tick() => false,
            _ = wake.notified() => false,
        };
        if stopping {
            return;
        }
        // This runtime serves only the loop: the pass blocks it, not the
        // API's workers, and the API's load does not delay it. A panicking
        // pass is logged and the next one runs (the core lock survives it).
        let pass = std::panic::AssertUnwindSafe(|| {
            probe.check(&ctx);
            reconcile_pass(&ctx)
        });
        if std::panic::catch_unwind(pass).is_err() {
            tracing::error!("reconcile pass panicked");
        }
    }
}

/// Starts the reconcile loop on a thread of its own with a runtime of its
/// own, so neither the API's worker threads nor its blocking pool, both
/// of which a flood of calls can fill, stand between the loop and its
/// period.
fn spawn_reconcile_thread(
    ctx: Arc<AgentContext>,
    period: Duration,
    exit_watches: bool,
    probe: TopologyProbe,
    stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("sevplace-reconcile".into())
        .spawn(move || rt.block_on(reconcile_loop(ctx, period, exit_watches, probe, stop)))
}

/// Opens a pidfd for every managed VM process not watched yet; its exit
/// wakes the loop.
fn watch_exits(
    ctx: &Arc<AgentContext>,
    wake: &Arc<tokio::sync::Notify>,
    watched: &mut HashSet<(u32, u64)>,
) {
    let (procs, scanner) = {
        let core = ctx.lock();
        (core.managed_processes(), core.scanner())
    };
    let live: HashSet<(u32, u64)> = procs.iter().copied().collect();
    watched.retain(|p| live.contains(p));
    for (pid, start) in procs {
        if watched.contains(&(pid, start)) {
            continue;
        }
        match VmExitWatch::open(&scanner, pid, start) {
            Ok(w) => {
                watched.insert((pid, start));
                let wake = wake.clone();
                tokio::spawn(async move {
                    if w.exited().await.is_ok() {
                        tracing::debug!(pid, "VM process exited");
                    }
                    wake.notify_one();
                });
            }
            // Already gone: the next pass releases it.
            Err(e) if e.is_gone() => wake.notify_one(),
            Err(e) => tracing::debug!(pid, error = %e, "no exit watch"),
        }
    }
}

/// Runs the daemon until a shutdown signal.
pub async fn run(settings: Settings, options: RunOptions) -> Result<(), DaemonError> {
    let topology = Topology::from_sysfs(&settings.host_path("/sys"))?;
    if !settings.reserved_cpus.is_subset(&topology.online) {
        return Err(DaemonError::Reserved {
            reserved: settings.reserved_cpus.to_string(),
            online: topology.online.to_string(),
        });
    }
    tracing::info!(
        cpus = %topology.online,
        l3_domains = topology.l3_domains.len(),
        numa_nodes = topology.numa_nodes.len(),
        "host topology read"
    );
    let metrics = Arc::new(Metrics::new());
    metrics.set_topology(&topology, settings.reserved_cpus.len());
    let module = ModuleReader::new(settings.host_path("/sys/kernel/sevflush"));
    let status = module.status();
    tracing::info!(state = ?status.state, detail = %status.message, "sevflush module");

    let cgroups = match CpusetWriter::detect(settings.host_path("/sys/fs/cgroup")) {
        Ok(w) => {
            tracing::info!(hierarchy = ?w.hierarchy(), "cpuset cgroups");
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no cpuset hierarchy: pinning by affinity only");
            None
        }
    };
    prepare_state_dir(&settings.state_dir)?;
    tracing::info!(dir = %settings.state_dir.display(), "state directory");
    let uid = nix::unistd::Uid::effective().as_raw();
    let store = CheckpointStore::in_dir(&settings.state_dir);
    if options.reset_state {
        match store.reset() {
            Ok(Some(moved)) => {
                tracing::warn!(to = %moved.display(), "checkpoint moved aside; starting without intents")
            }
            Ok(None) => tracing::info!("no checkpoint to reset"),
            Err(source) => {
                return Err(DaemonError::Checkpoint {
                    fix: checkpoint_fix(&source, &settings.state_dir, uid),
                    source,
                })
            }
        }
    }
    let events = Arc::new(EventBus::new(1024));
    let core = AgentCore::new(
        Arc::new(topology),
        Reservations {
            host: settings.reserved_cpus.clone(),
            whole_cores_for_plain: settings.whole_cores_for_plain_vms,
            ..Reservations::default()
        },
        HostAccess {
            scanner: VmScanner::new(settings.host_path("/proc"))
                .with_full_rescan_every(settings.full_rescan_every),
            cgroups,
            module,
            affinity: Arc::new(SchedAffinity),
        },
        store,
        metrics.clone(),
        events.clone(),
    )
    .map_err(|e| match e {
        AgentError::Checkpoint(source) => DaemonError::Checkpoint {
            fix: checkpoint_fix(&source, &settings.state_dir, uid),
            source,
        },
        other => DaemonError::Core(other),
    })?;
    let mut core = core;
    core.set_auto_place(settings.auto_place_confidential);
    core.set_scrub_min_interval(Duration::from_millis(settings.scrub_min_interval_ms));
    let mut access = AccessPolicy::resolve(
        settings.read_group.as_deref(),
        settings.admin_group.as_deref(),
    )?;
    if let Some(tls) = &settings.tls {
        access.tls_admin_clients = tls.admin_clients.clone();
    }
    // The TLS files are read and checked before anything is bound, so a bad
    // file stops the start with its name.
    let tls_config = match (&settings.listen_tcp, &settings.tls) {
        (Some(_), Some(tls)) => Some(crate::tls::server_config(tls)?),
        _ => None,
    };
    let fleet_link = match &settings.fleet {
        Some(_) => Some(crate::fleet::link(&settings.state_dir)?),
        None => None,
    };
    let ctx = Arc::new(AgentContext {
        access,
        core: Arc::new(PriorityMutex::new(core)),
        events,
        metrics: metrics.clone(),
    });
    // The first pass runs before the socket is bound, so the first answer
    // already reflects the host.
    let first = ctx.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || reconcile_pass(&first)).await {
        tracing::error!(error = %e, "first reconcile pass panicked");
    }

    let fleet_api_link = fleet_link.as_ref().map(|(l, _)| l.clone());
    // The fleet reporter starts after the first pass, so its first sync
    // already reflects the host; placement changes wake it.
    let fleet_reporter = match (settings.fleet.clone(), fleet_link) {
        (Some(fs), Some((link, rx))) => {
            tracing::info!(placement_url = %fs.placement_url, host = %fs.host_name, "fleet reporting to OpenStack Placement");
            let r = crate::fleet::spawn(
                fs,
                settings.host_path("/sys/module/kvm_amd/parameters"),
                ctx.clone(),
                link,
                rx,
            )
            .map_err(DaemonError::FleetThread)?;
            Some(r)
        }
        _ => None,
    };

    let (socket, unix_listener) = OwnedSocket::bind(
        &settings.socket,
        settings.socket_mode,
        settings.socket_group.as_deref(),
    )?;
    let tcp_listener = match settings.listen_tcp {
        Some(addr) => Some(server::bind_tcp(addr).await?),
        None => None,
    };
    let metrics_listener = match settings.metrics_addr {
        Some(addr) => Some(server::bind_tcp(addr).await?),
        None => None,
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SevplaceServiceServer<SevplaceApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sevplace_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcio-reflection and older grpcurl speak only v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sevplace_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let api =
        SevplaceServiceServer::new(SevplaceApi::with_fleet(ctx.clone(), fleet_api_link.clone()))
            .max_decoding_message_size(settings.max_message_bytes);
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(settings.max_concurrent_streams)
        .timeout(Duration::from_millis(settings.request_timeout_ms));
    // The Unix socket accepts the socket path as `:authority` (grpc-core
    // clients send it); the TCP listeners refuse it (crate::authority).
    let router = server
        .clone()
        .add_service(health_service.clone())
        .add_service(reflection.clone())
        .add_service(reflection_v1alpha.clone())
        .add_service(api.clone());
    let tcp_router = server
        .layer(crate::authority::tcp_authority_layer())
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(api);

    let (stop_tx, stop_rx) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let mut tasks = tokio::task::JoinSet::new();
    let period = Duration::from_millis(settings.reconcile_period_ms);
    // pidfds name real processes: only with the real /proc.
    let exit_watches = settings.host_root == std::path::Path::new("/");
    let probe = TopologyProbe::new(settings.host_path("/sys"), settings.reserved_cpus.len());
    let reconcile_thread =
        spawn_reconcile_thread(ctx.clone(), period, exit_watches, probe, stop_rx.clone())
            .map_err(DaemonError::ReconcileThread)?;
    if let Some(r) = &fleet_reporter {
        let link = r.link.clone();
        let mut events = ctx.events.subscribe();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            use crate::reconcile::events::EventKind;
            use tokio::sync::broadcast::error::RecvError;
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    ev = events.recv() => match ev {
                        Ok(e) if matches!(e.kind, EventKind::Placed { .. } | EventKind::Released { .. } | EventKind::Exited { .. }) => link.wake(),
                        Ok(_) => {}
                        // Missed events: a sync reads everything anyway.
                        Err(RecvError::Lagged(_)) => link.wake(),
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
    }
    let notifier = Notifier::from_env();
    if let Some(wd) = notifier.watchdog() {
        tasks.spawn(watchdog_feeder(
            notifier.clone(),
            wd / 2,
            (period * 3).max(wd),
            stop_rx.clone(),
        ));
    }
    if let Some(l) = metrics_listener {
        tracing::info!(addr = %local_addr(&l), "serving /metrics");
        tasks.spawn(server::serve_metrics(l, metrics.clone(), stop_rx.clone()));
    }
    if let Some(l) = tcp_listener {
        let addr = local_addr(&l);
        let r = tcp_router;
        let rx = stop_rx.clone();
        match tls_config {
            Some(config) => {
                tracing::info!(
                    addr = %addr,
                    allowed_clients = %settings.tls.as_ref().map_or(String::new(), |t| t.allowed_clients.join(",")),
                    admin_clients = %settings.tls.as_ref().map_or(String::new(), |t| t.admin_clients.join(",")),
                    "serving gRPC on TCP with mutual TLS"
                );
                let incoming =
                    crate::tls::incoming(l, config, crate::tls::HANDSHAKE_TIMEOUT, metrics.clone());
                tasks.spawn(async move {
                    if let Err(e) = r.serve_with_incoming_shutdown(incoming, wait(rx)).await {
                        tracing::error!(error = %e, "TCP gRPC server failed");
                    }
                });
            }
            None => {
                tracing::warn!(
                    addr = %addr,
                    "server.insecure_tcp: serving gRPC on plaintext TCP without client \
                     authentication (read-only for everyone who can reach the address)"
                );
                tasks.spawn(async move {
                    if let Err(e) = r
                        .serve_with_incoming_shutdown(TcpListenerStream::new(l), wait(rx))
                        .await
                    {
                        tracing::error!(error = %e, "TCP gRPC server failed");
                    }
                });
            }
        }
    }
    tracing::info!(socket = %socket.path().display(), "serving gRPC");
    notifier.ready();
    let unix = router.serve_with_incoming_shutdown(
        UnixListenerStream::new(unix_listener),
        wait(stop_rx.clone()),
    );
    tokio::pin!(unix);
    let result = tokio::select! {
        r = &mut unix => r.map_err(DaemonError::from),
        s = shutdown_signal() => {
            s?;
            let _ = stop_tx.send(true);
            // In-flight calls get a grace period; idle client connections
            // do not hold the exit.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut unix).await {
                Ok(r) => r.map_err(DaemonError::from),
                Err(_) => {
                    tracing::warn!(grace_ms = u64::try_from(SHUTDOWN_GRACE.as_millis()).unwrap_or(u64::MAX), "connections still open after the grace period; closing them");
                    Ok(())
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    notifier.stopping();
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tasks.abort_all();
    }
    // A pass in progress finishes (its checkpoint write is atomic); the
    // loop then sees the stop.
    let joined = tokio::task::spawn_blocking(move || reconcile_thread.join());
    match tokio::time::timeout(SHUTDOWN_GRACE, joined).await {
        Ok(Ok(Ok(()))) => {}
        Ok(_) => tracing::error!("reconcile loop panicked"),
        Err(_) => tracing::warn!("reconcile pass still running after the grace period"),
    }
    if let Some(r) = &fleet_reporter {
        r.stop();
    }
    drop(socket);
    tracing::info!("stopped");
    result
}
