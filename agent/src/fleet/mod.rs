//! fleet: this host's part in fleet bin-packing through OpenStack
//! Placement (docs/fleet.md). Not to be confused with `placement`, the
//! per-host engine.
//!
//! The reporter runs on a thread of its own: the core tells it that
//! placements changed (a wake-up on Placed, Released and Exited events),
//! it takes a snapshot of the placements and consumers under the core's
//! lock, computes the tree ([`tree::desired`], pure) and makes Placement
//! hold it ([`sync::Reporter`]) without the lock. PlaceVm never waits for
//! Placement.

pub(crate) mod client;
pub(crate) mod consumers;
pub(crate) mod scheduler;
pub(crate) mod sync;
pub(crate) mod tree;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::conditions::ConditionKind;
use crate::reconcile::AgentContext;
use crate::types::VmId;

pub use crate::config::fleet::FleetAuth;
pub(crate) use crate::config::fleet::FleetSettings;
pub(crate) use client::FleetError;
pub use client::PlacementClient;
pub(crate) use consumers::{ConsumerStore, ConsumerStoreError};
pub(crate) use sync::Reporter;
pub(crate) use tree::{Consumer, FlushMode, HostFacts, SevSupport};

/// What the API and the reporter share.
pub(crate) struct FleetLink {
    store: Mutex<ConsumerStore>,
    wake: SyncSender<()>,
}

impl FleetLink {
    /// The consumer store, for PlaceVm (taken while the core is locked, so
    /// a snapshot sees the consumer and the placement together).
    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, ConsumerStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the reporter for a sync; never blocks.
    pub(crate) fn wake(&self) {
        let _ = self.wake.try_send(());
    }
}

/// Whether a kvm_amd boolean parameter is on (`Y` or `1`).
fn param_on(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|s| matches!(s.trim(), "Y" | "y" | "1"))
        .unwrap_or(false)
}

/// The SEV classes the host's KVM offers, from
/// `<params>/{sev,sev_es,sev_snp}` (`/sys/module/kvm_amd/parameters`).
pub(crate) fn read_sev_support(params: &Path) -> SevSupport {
    SevSupport {
        sev: param_on(&params.join("sev")),
        sev_es: param_on(&params.join("sev_es")),
        sev_snp: param_on(&params.join("sev_snp")),
    }
}

/// The reporter's thread and its link.
pub(crate) struct FleetReporter {
    pub(crate) link: Arc<FleetLink>,
    stop: Arc<AtomicBool>,
}

impl FleetReporter {
    /// Stops the thread after its current sync (it is not joined: a sync
    /// blocked on an unreachable Placement ends at its request timeout).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.link.wake();
    }
}

/// Loads the consumer store from `state_dir`.
pub(crate) fn link(
    state_dir: &Path,
) -> Result<(Arc<FleetLink>, mpsc::Receiver<()>), ConsumerStoreError> {
    let store = ConsumerStore::load(state_dir)?;
    let (tx, rx) = mpsc::sync_channel(1);
    Ok((
        Arc::new(FleetLink {
            store: Mutex::new(store),
            wake: tx,
        }),
        rx,
    ))
}

/// Starts the reporter thread.
pub(crate) fn spawn(
    settings: FleetSettings,
    kvm_params: PathBuf,
    ctx: Arc<AgentContext>,
    link: Arc<FleetLink>,
    rx: mpsc::Receiver<()>,
) -> std::io::Result<FleetReporter> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let l = link.clone();
    std::thread::Builder::new()
        .name("sevplace-fleet".into())
        .spawn(move || run(settings, kvm_params, ctx, l, rx, stopping))?;
    link.wake();
    Ok(FleetReporter { link, stop })
}

fn run(
    settings: FleetSettings,
    kvm_params: PathBuf,
    ctx: Arc<AgentContext>,
    link: Arc<FleetLink>,
    rx: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
) {
    let client = PlacementClient::new(
        &settings.placement_url,
        settings.auth.clone(),
        settings.request_timeout,
    );
    let mut reporter = Reporter::new(client, settings.root.clone());
    let mut last_full: Option<Instant> = None;
    let mut failing = false;
    let mut unpublished = false;
    let mut unpublished_logged: Vec<String> = Vec::new();
    loop {
        // A failed sync, or consumers Placement had no room for (claims
        // racing with the agent's rewrites), are tried again soon.
        let wait = if failing || unpublished {
            settings.retry_period
        } else {
            settings.sync_period
        };
        match rx.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while rx.try_recv().is_ok() {}
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // A sync after a failure reads everything again. A periodic one
        // reads every consumer's allocations again (changes others made to
        // them); the providers it checks against the generations of the
        // tree listing, as every sync does, so one listing covers them.
        if failing {
            reporter.forget_cache();
            last_full = Some(Instant::now());
        } else if last_full.is_none_or(|t| t.elapsed() >= settings.sync_period) {
            reporter.forget_consumers();
            last_full = Some(Instant::now());
        }
        let start = Instant::now();
        let (desired, gone) = {
            let core = ctx.lock();
            let status = core.module_status();
            let facts = HostFacts {
                host_name: settings.host_name.clone(),
                sev: read_sev_support(&kvm_params),
                flush: FlushMode::from_module(
                    status.state == crate::kmod::ModuleState::Loaded,
                    &status.mode,
                ),
            };
            let store = link.store();
            let desired = tree::desired(
                &facts,
                core.topology(),
                core.placements(),
                core.reservations(),
                store.consumers(),
            );
            let gone: Vec<Consumer> = store
                .consumers()
                .iter()
                .filter(|(vm, _)| core.placements().get(vm).is_none())
                .map(|(_, c)| c.clone())
                .chain(store.retired().iter().cloned())
                .collect();
            (desired, gone)
        };
        let result = reporter.sync(&desired, &gone);
        ctx.metrics
            .observe_fleet_sync(result.is_ok(), start.elapsed());
        let outcome = match result {
            Ok(o) => {
                if let Err(e) = link.store().forget(&o.forgotten) {
                    tracing::warn!(error = %e, "fleet: cannot update the consumer store");
                }
                unpublished = !o.unpublished.is_empty();
                if o.unpublished != unpublished_logged {
                    if !o.unpublished.is_empty() {
                        tracing::warn!(consumers = ?o.unpublished, "fleet: Placement has no room for these consumers' allocations; their CPUs are counted in reserved");
                    }
                    unpublished_logged = o.unpublished.clone();
                }
                for w in &o.warnings {
                    tracing::warn!(warning = %w, "fleet");
                }
                tracing::debug!(writes = o.writes, elapsed = ?start.elapsed(), "fleet sync");
                failing = false;
                Ok(())
            }
            Err(e) => {
                failing = true;
                // The next try reads everything again.
                Err(format!("Placement at {}: {e}", settings.placement_url))
            }
        };
        ctx.lock()
            .set_condition(ConditionKind::FleetSyncFailing, outcome);
    }
}

/// Validates a PlaceVm consumer: a UUID and non-empty project and user ids.
pub(crate) fn consumer_from_parts(
    uuid: &str,
    project_id: &str,
    user_id: &str,
) -> Result<Consumer, (&'static str, String)> {
    let u = uuid.trim().to_ascii_lowercase();
    let ok = u.len() == 36
        && u.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if !ok {
        return Err((
            "placement_consumer.uuid",
            format!("{uuid:?} is not a UUID (8-4-4-4-12 hex digits)"),
        ));
    }
    for (field, v) in [
        ("placement_consumer.project_id", project_id),
        ("placement_consumer.user_id", user_id),
    ] {
        if v.is_empty() || v.len() > 255 || v.chars().any(|c| c.is_control()) {
            return Err((field, "1-255 printable characters".into()));
        }
    }
    Ok(Consumer {
        uuid: u,
        project_id: project_id.to_string(),
        user_id: user_id.to_string(),
    })
}

/// Records `vm`'s consumer before PlaceVm acts; returns what to restore if
/// the placement fails.
pub(crate) fn record_consumer(
    link: &FleetLink,
    vm: &VmId,
    consumer: Consumer,
) -> Result<Option<Consumer>, ConsumerStoreError> {
    let mut store = link.store();
    let before = store.get(vm).cloned();
    store.record(vm, consumer)?;
    Ok(before)
}

/// Undoes [`record_consumer`] after a failed PlaceVm.
pub(crate) fn restore_consumer(link: &FleetLink, vm: &VmId, before: Option<Consumer>) {
    let mut store = link.store();
    let r = match before {
        Some(c) => store.record(vm, c),
        None => store.unrecord(vm),
    };
    if let Err(e) = r {
        tracing::warn!(vm = %vm, error = %e, "fleet: cannot restore the consumer store");
    }
}

#[cfg(test)]
mod tests;
