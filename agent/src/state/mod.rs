//! The intent checkpoint: what the orchestrator asked for and the placement
//! chosen for it, persisted before any pin is applied.
//!
//! Two files (default directory `/var/lib/sevplace`): the snapshot
//! `checkpoint.json`, one JSON document,
//!
//! ```json
//! {"format":"sevplace-checkpoint","version":3,"crc32":"…",
//!  "payload":{"generation":7,"intents":[ ... ]}}
//! ```
//!
//! and the journal `checkpoint.json.journal`, the changes since that
//! snapshot, one checksummed record per write ([`journal`]). The checkpoint
//! is the snapshot with the journal's records applied.
//!
//! Each intent stores its decision once, in CPU ids: the request and the
//! CPUs decided ([`PlacementRecord`]), never the engine's topology indices;
//! the engine state is rebuilt from it on load and checked against the
//! topology the host has then (`reconcile::refit`). Versions, kubelet's
//! cpumanager checkpoint being the model:
//!
//! | version | written by | read by this build |
//! |---|---|---|
//! | 1 | before the decision had a format of its own: `placement` plus the engine's whole `Placement` (`engine`, with indices) | yes, migrated on load ([`v1`]); saved as 3 by the next write |
//! | 2 | the payload of 3, written whole on every change (no journal) | yes; saved as 3 by the next write |
//! | 3 | this build: the payload of 2; a journal may follow the snapshot | yes |
//! | > 3 | a newer sevplaced | no: [`CheckpointError::NewerVersion`], the file is left untouched |
//!
//! Version 3 exists so that a build that knows no journal refuses the
//! snapshot rather than start from it without the journal's decisions.
//!
//! `crc32` is CRC-32 (IEEE) of the exact bytes of `payload` as stored in the
//! file, in lowercase hex. The payload is kept byte for byte when loading
//! (`RawValue`), so the checksum does not depend on re-serialisation.
//!
//! Writes are durable before any caller is answered. [`CheckpointWriter`]
//! appends a change to the journal and syncs it; when the journal would
//! outgrow the snapshot, it rewrites the snapshot instead: the document goes
//! to `<file>.tmp`, which is fsynced, renamed over `<file>`, and the
//! directory is fsynced, so after a crash the file is either the old or the
//! new snapshot, never a mix; only then is the journal emptied. A leftover
//! `<file>.tmp` is ignored and overwritten by the next snapshot.
//!
//! Loading: missing files are an empty checkpoint. A snapshot that is
//! truncated, not JSON, fails its checksum, or has a newer `version`, and a
//! journal whose records do not chain onto it, are errors naming the file
//! and the fault; they are never dropped silently. A torn last append of
//! the journal (a crash mid-write, never acknowledged) is ignored.
//! [`CheckpointStore::reset`] moves both files aside to
//! `<file>.bad-<unix seconds>` and `<file>.journal.bad-<unix seconds>` so an
//! operator can start fresh and keep the evidence.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::VmKey;
use crate::{ConfidentialClass, CpuSet, VmId};

mod v1;

pub(crate) mod journal;

pub(crate) mod selector;

/// Directory of the checkpoint when none is configured.
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/sevplace";
/// File name of the checkpoint inside the state directory.
pub(crate) const CHECKPOINT_FILE: &str = "checkpoint.json";
/// The `format` field of the document.
pub(crate) const CHECKPOINT_FORMAT: &str = "sevplace-checkpoint";
/// The newest format version this build reads and the one it writes.
pub(crate) const CHECKPOINT_VERSION: u32 = 3;

/// How the orchestrator identified the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum VmSelector {
    /// A process; `start_time` (stat field 22) guards against pid reuse.
    Process {
        /// The process id.
        pid: u32,
        /// Its stat field 22, when the orchestrator gave it.
        start_time: Option<u64>,
    },
    /// A libvirt domain by name.
    LibvirtDomain {
        /// The domain's name.
        name: String,
    },
    /// A cgroup path (as in `/proc/<pid>/cgroup`).
    CgroupPath {
        /// The path.
        path: String,
    },
}

/// The request fields of a PlaceVm call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRequest {
    /// vCPUs of the VM.
    pub vcpus: u32,
    /// Declared by the orchestrator; `None`: taken from discovery.
    pub class: Option<ConfidentialClass>,
    /// Whole cores for this VM (no sharing with other VMs).
    pub dedicated: bool,
    /// Preferred NUMA node.
    pub numa_node: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The decision for an intent, in CPU ids (never topology indices): the
/// engine's placement is rebuilt from it and the request on load
/// ([`crate::placement::rebuild`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// The class the VM was placed as (the request's, or the one discovery
    /// found when the request had none).
    pub class: ConfidentialClass,
    /// Every CPU the VM may run on.
    pub cpus: CpuSet,
    /// One CPU set per vCPU, by index.
    pub vcpu_cpus: Vec<CpuSet>,
    /// The set for emulator and I/O threads.
    pub emulator_cpus: Option<CpuSet>,
    /// The VM's CPUs grouped by L3 domain, in the order the vCPUs fill
    /// them; empty for a decision migrated from version 1, which did not
    /// record it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l3_groups: Vec<CpuSet>,
    /// NUMA node ids of those L3 domains, ascending.
    pub numa_nodes: Vec<u32>,
    /// The VM was placed in a domain of the other pool for want of room.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shares_confidential_domain: bool,
}

impl PlacementRecord {
    /// Every CPU the placement uses.
    #[cfg(test)]
    pub(crate) fn all_cpus(&self) -> CpuSet {
        self.vcpu_cpus
            .iter()
            .chain(self.emulator_cpus.iter())
            .fold(self.cpus.clone(), |acc, s| acc.union(s))
    }

    /// The record of the engine's placement `p` on `topo`.
    pub fn of_placement(
        topo: &crate::topology::Topology,
        p: &crate::placement::Placement,
        emulator_cpus: Option<CpuSet>,
    ) -> Self {
        Self {
            class: p.request.class,
            cpus: p.cpus.clone(),
            vcpu_cpus: p.vcpu_cpus.clone(),
            emulator_cpus,
            l3_groups: p
                .l3_domains
                .iter()
                .filter_map(|&d| topo.l3_domains.get(d))
                .map(|d| d.cpus.intersection(&p.cpus))
                .collect(),
            numa_nodes: p.numa_nodes.clone(),
            shares_confidential_domain: p.shares_confidential_domain,
        }
    }

    /// What the engine rebuilds its placement from.
    pub(crate) fn decided(&self) -> crate::placement::Decided<'_> {
        crate::placement::Decided {
            cpus: &self.cpus,
            vcpu_cpus: &self.vcpu_cpus,
            l3_groups: &self.l3_groups,
            numa_nodes: &self.numa_nodes,
            shares_confidential_domain: self.shares_confidential_domain,
        }
    }
}

/// One intent: a VM, the request, and the decision once made.
///
/// In the file the VM is a typed key (`{"named":"db-1"}` or
/// `{"process":4242}`), so an orchestrator id never reads as a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "IntentWire", into = "IntentWire")]
pub struct IntentRecord {
    /// The orchestrator's id of the VM.
    pub vm_id: VmId,
    /// Which process the VM is.
    pub selector: VmSelector,
    /// The request fields.
    pub request: PlacementRequest,
    /// `None` until the engine has chosen (a validate-only request is
    /// never stored).
    pub placement: Option<PlacementRecord>,
}

impl IntentRecord {
    /// The VM this intent is for.
    pub(crate) fn key(&self) -> VmKey {
        VmKey::of_id(&self.vm_id)
    }

    /// The engine's request of this intent, with the class it was placed
    /// as; `None` before a decision.
    pub(crate) fn engine_request(&self) -> Option<crate::placement::PlacementRequest> {
        let record = self.placement.as_ref()?;
        Some(crate::placement::PlacementRequest {
            vm_id: self.vm_id.clone(),
            vcpus: self.request.vcpus,
            class: record.class,
            dedicated: self.request.dedicated,
            numa_preference: self.request.numa_node,
        })
    }
}

/// The VM of an intent as the file stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
enum StoredKey {
    /// An orchestrator's id (never of the form `pid-<N>`).
    Named(String),
    /// The pid of a VM no orchestrator named (auto placement).
    Process(u32),
}

/// An intent as the file (version 2) stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IntentWire {
    vm: StoredKey,
    selector: VmSelector,
    request: PlacementRequest,
    placement: Option<PlacementRecord>,
}

impl StoredKey {
    fn of_id(id: &VmId) -> Self {
        match VmKey::of_id(id) {
            VmKey::Named(id) => Self::Named(id.to_string()),
            VmKey::Process(pid) => Self::Process(pid),
        }
    }

    fn into_id(self) -> Result<VmId, String> {
        let key = match self {
            Self::Named(name) => VmKey::Named(VmKey::named(&name).map_err(|e| e.to_string())?),
            Self::Process(0) => return Err("process key with pid 0".into()),
            Self::Process(pid) => VmKey::Process(pid),
        };
        Ok(key.to_id())
    }
}

impl TryFrom<IntentWire> for IntentRecord {
    type Error = String;
    fn try_from(w: IntentWire) -> Result<Self, String> {
        Ok(Self {
            vm_id: w.vm.into_id()?,
            selector: w.selector,
            request: w.request,
            placement: w.placement,
        })
    }
}

impl From<IntentRecord> for IntentWire {
    fn from(i: IntentRecord) -> Self {
        Self {
            vm: StoredKey::of_id(&i.vm_id),
            selector: i.selector,
            request: i.request,
            placement: i.placement,
        }
    }
}

/// The checkpoint payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Increases by one on every save.
    pub generation: u64,
    /// Sorted by `vm_id`, one per VM. Each intent is shared: a copy of
    /// the checkpoint (one per decision) copies pointers, not intents, and
    /// [`journal::Delta::between`] tells an unchanged intent by its pointer.
    pub intents: Vec<Arc<IntentRecord>>,
}

impl Checkpoint {
    fn position(&self, vm: &VmId) -> Result<usize, usize> {
        self.intents.binary_search_by(|i| i.vm_id.cmp(vm))
    }

    /// The intent of `vm`.
    pub(crate) fn get(&self, vm: &VmId) -> Option<&IntentRecord> {
        let pos = self.position(vm).ok()?;
        Some(&self.intents[pos])
    }

    /// Inserts or replaces the intent of `intent.vm_id`; returns the old one.
    pub(crate) fn upsert(&mut self, intent: IntentRecord) -> Option<Arc<IntentRecord>> {
        self.upsert_shared(Arc::new(intent))
    }

    /// [`Self::upsert`] of an intent already shared.
    pub(crate) fn upsert_shared(&mut self, intent: Arc<IntentRecord>) -> Option<Arc<IntentRecord>> {
        match self.position(&intent.vm_id) {
            Ok(pos) => Some(std::mem::replace(&mut self.intents[pos], intent)),
            Err(pos) => {
                self.intents.insert(pos, intent);
                None
            }
        }
    }

    /// Removes the intent of `vm`.
    pub(crate) fn remove(&mut self, vm: &VmId) -> Option<Arc<IntentRecord>> {
        let pos = self.position(vm).ok()?;
        Some(self.intents.remove(pos))
    }
}

/// Errors from loading or saving the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file exists but cannot be trusted.
    #[error("checkpoint {path} is corrupt: {what}; it was left untouched: reset the checkpoint to move it aside to {}.bad-<time> and start without intents", path.display())]
    Corrupt {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// Written by a newer sevplace.
    #[error("checkpoint {path} has format version {found}, newer than version {supported} this sevplaced reads; run the newer sevplaced, or reset the checkpoint to move it aside and start without intents", path = path.display())]
    NewerVersion {
        /// The checkpoint file.
        path: PathBuf,
        /// The file's format version.
        found: u64,
        /// The newest version this build reads.
        supported: u32,
    },
    /// An I/O error, with the operation that failed.
    #[error("checkpoint {op} {path}: {source}", path = path.display())]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The file or directory it was on.
        path: PathBuf,
        /// What it returned.
        source: std::io::Error,
    },
}

/// The on-disk document, for writing.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    format: &'static str,
    version: u32,
    crc32: String,
    payload: &'a serde_json::value::RawValue,
}

/// The on-disk document, for reading.
#[derive(Deserialize)]
struct EnvelopeIn {
    format: String,
    crc32: String,
    payload: Box<serde_json::value::RawValue>,
}

fn crc_hex(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

/// Reads and writes the checkpoint file.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    path: PathBuf,
}

impl Default for CheckpointStore {
    fn default() -> Self {
        Self::in_dir(DEFAULT_STATE_DIR)
    }
}

impl CheckpointStore {
    /// A store at an explicit file path.
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// A store at `<dir>/checkpoint.json`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        Self::new(dir.as_ref().join(CHECKPOINT_FILE))
    }

    /// The checkpoint file.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn tmp_path(&self) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(".tmp");
        PathBuf::from(s)
    }

    /// The journal beside the snapshot: `<file>.journal`.
    pub fn journal_path(&self) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(journal::JOURNAL_SUFFIX);
        PathBuf::from(s)
    }

    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { op, path, source }
    }

    /// Reads `path`; a missing file is `None`.
    fn read_if_there(&self, path: &Path) -> Result<Option<Vec<u8>>, CheckpointError> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("read", path)(e)),
        }
    }

    /// Loads the checkpoint: the snapshot, then the journal's records after
    /// it. A missing snapshot is an empty checkpoint (a journal without one
    /// does not chain on generation 0 and is corrupt).
    pub fn load(&self) -> Result<Checkpoint, CheckpointError> {
        let mut checkpoint = match self.read_if_there(&self.path)? {
            None => Checkpoint::default(),
            Some(bytes) => decode(&bytes).map_err(|fault| match fault {
                DecodeFault::Corrupt(what) => CheckpointError::Corrupt {
                    path: self.path.clone(),
                    what,
                },
                DecodeFault::Newer(found) => CheckpointError::NewerVersion {
                    path: self.path.clone(),
                    found,
                    supported: CHECKPOINT_VERSION,
                },
            })?,
        };
        let journal = self.journal_path();
        if let Some(bytes) = self.read_if_there(&journal)? {
            let replayed = journal::replay(&bytes, &mut checkpoint).map_err(|what| {
                CheckpointError::Corrupt {
                    path: journal.clone(),
                    what,
                }
            })?;
            if replayed.applied + replayed.skipped > 0 {
                tracing::info!(
                    journal = %journal.display(),
                    applied = replayed.applied,
                    skipped = replayed.skipped,
                    generation = checkpoint.generation,
                    "checkpoint journal replayed on the snapshot (skipped records are older than the snapshot)"
                );
            }
            if replayed.torn_bytes > 0 {
                tracing::warn!(
                    journal = %journal.display(),
                    bytes = replayed.torn_bytes,
                    "checkpoint journal ends in an append a crash interrupted (never acknowledged); ignored"
                );
            }
        }
        Ok(checkpoint)
    }

    /// Appends `line` (one journal record) to the journal and syncs it; a
    /// new journal file's directory entry is synced too. A failed append
    /// cuts the journal back to `at`, its length before, so no part of a
    /// write reported failed is replayed.
    fn append_journal(&self, line: &[u8], at: u64) -> Result<(), CheckpointError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.journal_path();
        let created = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(self.io("open journal", &path))?;
        let appended = f
            .write_all(line)
            .map_err(self.io("append", &path))
            .and_then(|()| f.sync_data().map_err(self.io("fsync journal", &path)));
        if let Err(e) = appended {
            let _ = f.set_len(at).and_then(|()| f.sync_data());
            return Err(e);
        }
        if created {
            let dir = self.dir();
            sync_dir(&dir).map_err(self.io("fsync directory", &dir))?;
        }
        Ok(())
    }

    /// Empties the journal after a snapshot made its records redundant.
    fn truncate_journal(&self) -> std::io::Result<()> {
        match std::fs::OpenOptions::new()
            .write(true)
            .open(self.journal_path())
        {
            Ok(f) => {
                f.set_len(0)?;
                f.sync_data()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Saves `checkpoint` as the snapshot, atomically and durably (temp
    /// file, fsync, rename, fsync of the directory), then empties the
    /// journal; returns the snapshot's size. Creates the directory when
    /// missing.
    ///
    /// The journal is emptied only once the snapshot is durable: until
    /// then a crash finds the old snapshot and the journal that completes
    /// it; after, records the snapshot covers are skipped on load. A
    /// journal that cannot be emptied is therefore not a failed save (the
    /// snapshot is on disk); it is logged.
    pub fn save(&self, checkpoint: &Checkpoint) -> Result<u64, CheckpointError> {
        self.snapshot(checkpoint).map(|(bytes, _)| bytes)
    }

    /// Writes the snapshot, then empties the journal; returns the
    /// snapshot's size and whether the journal is empty. A journal that
    /// cannot be emptied is logged, not an error (see [`Self::save`]).
    fn snapshot(&self, checkpoint: &Checkpoint) -> Result<(u64, bool), CheckpointError> {
        let bytes = self.write_snapshot(checkpoint)?;
        match self.truncate_journal() {
            Ok(()) => Ok((bytes, true)),
            Err(e) => {
                tracing::warn!(journal = %self.journal_path().display(), error = %e, "cannot empty the checkpoint journal after a snapshot; its records are older than the snapshot and skipped on load, and every write is a snapshot until it can be emptied");
                Ok((bytes, false))
            }
        }
    }

    fn write_snapshot(&self, checkpoint: &Checkpoint) -> Result<u64, CheckpointError> {
        let bytes = encode(checkpoint).map_err(|e| CheckpointError::Io {
            op: "encode",
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(self.io("create directory", &dir))?;
        let tmp = self.tmp_path();
        let written = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(self.io("create", &tmp))?;
            f.write_all(&bytes).map_err(self.io("write", &tmp))?;
            f.sync_all().map_err(self.io("fsync", &tmp))
        })();
        if let Err(e) = written {
            // A partial temp file on a full disk holds space the next
            // attempt needs; the checkpoint itself is untouched.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &self.path).map_err(self.io("rename", &tmp))?;
        sync_dir(&dir).map_err(self.io("fsync directory", &dir))?;
        Ok(bytes.len() as u64)
    }

    /// Moves the checkpoint file aside to `<file>.bad-<unix seconds>` (a
    /// numeric suffix is added if that name is taken), and its journal to
    /// `<file>.journal.bad-<unix seconds>` the same way, and returns the
    /// snapshot's new path (the journal's when only it existed); `None`
    /// when there was neither. No file is ever deleted.
    pub(crate) fn reset(&self) -> Result<Option<PathBuf>, CheckpointError> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let snapshot = self.move_aside(&self.path, secs)?;
        let journal = self.move_aside(&self.journal_path(), secs)?;
        if snapshot.is_some() || journal.is_some() {
            let dir = self.dir();
            sync_dir(&dir).map_err(self.io("fsync directory", &dir))?;
        }
        Ok(snapshot.or(journal))
    }

    fn move_aside(&self, path: &Path, secs: u64) -> Result<Option<PathBuf>, CheckpointError> {
        if !path.exists() {
            return Ok(None);
        }
        let mut base = path.to_path_buf().into_os_string();
        base.push(format!(".bad-{secs}"));
        let mut target = PathBuf::from(&base);
        let mut n = 1;
        while target.exists() {
            let mut s = base.clone();
            s.push(format!(".{n}"));
            target = PathBuf::from(s);
            n += 1;
        }
        std::fs::rename(path, &target).map_err(self.io("move aside", path))?;
        tracing::warn!(from = %path.display(), to = %target.display(), "checkpoint file moved aside");
        Ok(Some(target))
    }
}

/// How [`CheckpointWriter::write`] made a checkpoint durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// One record appended to the journal, of this many bytes.
    Journal(u64),
    /// The whole checkpoint rewritten as the snapshot, of this many bytes,
    /// and the journal emptied.
    Snapshot(u64),
}

/// The journal never triggers a snapshot below this size, so a small
/// checkpoint is not rewritten every few decisions.
pub const JOURNAL_MIN_BYTES: u64 = 256 * 1024;

/// The one writer of a checkpoint: appends each change to the journal and
/// rewrites the snapshot when the journal would outgrow it (and at least
/// [`JOURNAL_MIN_BYTES`]), so the bytes written per change stay bounded by
/// a constant factor of the change, whatever the number of intents.
#[derive(Debug)]
pub struct CheckpointWriter {
    store: CheckpointStore,
    /// The journal's length after this writer's last write; `None` until
    /// this writer has written a snapshot, and after a failed write: the
    /// journal may end in a torn or refused record then, which nothing may
    /// follow, so the next write is a snapshot.
    journal_len: Option<u64>,
    snapshot_len: u64,
    journal_min: u64,
}

impl CheckpointWriter {
    /// A writer of `store`'s files; its first write is a snapshot.
    pub fn new(store: CheckpointStore) -> Self {
        Self {
            store,
            journal_len: None,
            snapshot_len: 0,
            journal_min: JOURNAL_MIN_BYTES,
        }
    }

    /// The same writer with another journal minimum than
    /// [`JOURNAL_MIN_BYTES`] (tests and benches fold the journal sooner).
    pub fn with_journal_min(mut self, bytes: u64) -> Self {
        self.journal_min = bytes;
        self
    }

    /// Makes `next` durable, `durable` being the checkpoint the files hold
    /// now (the last one this writer made durable, or the one loaded).
    pub fn write(
        &mut self,
        durable: &Checkpoint,
        next: &Checkpoint,
    ) -> Result<Written, CheckpointError> {
        if let Some(len) = self.journal_len.take() {
            let delta = journal::Delta::between(durable, next);
            let line = journal::encode_line(&delta).map_err(|e| CheckpointError::Io {
                op: "encode",
                path: self.store.journal_path(),
                source: std::io::Error::other(e),
            })?;
            let after = len + line.len() as u64;
            if after <= self.snapshot_len.max(self.journal_min) {
                self.store.append_journal(&line, len)?;
                self.journal_len = Some(after);
                return Ok(Written::Journal(line.len() as u64));
            }
        }
        let (bytes, emptied) = self.store.snapshot(next)?;
        self.snapshot_len = bytes;
        // The snapshot is durable, so the write succeeded; appends wait
        // until the journal can be emptied (it may end in a torn record),
        // every write until then is a snapshot.
        if emptied {
            self.journal_len = Some(0);
        }
        Ok(Written::Snapshot(bytes))
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Serialises a checkpoint into the on-disk document.
pub fn encode(checkpoint: &Checkpoint) -> Result<Vec<u8>, serde_json::Error> {
    let payload = serde_json::to_string(checkpoint)?;
    let raw = serde_json::value::RawValue::from_string(payload)?;
    let doc = EnvelopeOut {
        format: CHECKPOINT_FORMAT,
        version: CHECKPOINT_VERSION,
        crc32: crc_hex(raw.get().as_bytes()),
        payload: &raw,
    };
    let mut out = serde_json::to_vec(&doc)?;
    out.push(b'\n');
    Ok(out)
}

/// Why a checkpoint document was rejected; [`CheckpointStore::load`] adds
/// the file's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeFault {
    /// The document cannot be trusted.
    #[error("{0}")]
    Corrupt(String),
    /// The document has this format version, newer than this build reads.
    #[error("format version {0} is newer than version {CHECKPOINT_VERSION}")]
    Newer(u64),
}

/// Parses and checks an on-disk document (the inverse of [`encode`]).
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, DecodeFault> {
    // The version is checked first: a newer format may change the rest.
    let generic: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        DecodeFault::Corrupt(if e.is_eof() {
            format!("truncated ({} bytes): {e}", bytes.len())
        } else {
            format!("not valid JSON: {e}")
        })
    })?;
    let version = generic
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| DecodeFault::Corrupt("no numeric \"version\" field".into()))?;
    if version > u64::from(CHECKPOINT_VERSION) {
        return Err(DecodeFault::Newer(version));
    }
    if version == 0 {
        return Err(DecodeFault::Corrupt("version 0 does not exist".into()));
    }
    let env: EnvelopeIn = serde_json::from_slice(bytes)
        .map_err(|e| DecodeFault::Corrupt(format!("bad envelope: {e}")))?;
    if env.format != CHECKPOINT_FORMAT {
        return Err(DecodeFault::Corrupt(format!(
            "format is {:?}, expected {CHECKPOINT_FORMAT:?}",
            env.format
        )));
    }
    let computed = crc_hex(env.payload.get().as_bytes());
    if !env.crc32.eq_ignore_ascii_case(&computed) {
        return Err(DecodeFault::Corrupt(format!(
            "checksum mismatch: stored crc32 {}, computed {computed}",
            env.crc32
        )));
    }
    let checkpoint: Checkpoint = match version {
        1 => {
            let v1: v1::PayloadV1 = serde_json::from_str(env.payload.get())
                .map_err(|e| DecodeFault::Corrupt(format!("bad payload: {e}")))?;
            v1::migrate(v1).map_err(|e| {
                DecodeFault::Corrupt(format!("version 1 payload cannot be migrated: {e}"))
            })?
        }
        _ => serde_json::from_str(env.payload.get())
            .map_err(|e| DecodeFault::Corrupt(format!("bad payload: {e}")))?,
    };
    // `Checkpoint::upsert` relies on this order.
    if let Some(w) = checkpoint
        .intents
        .windows(2)
        .find(|w| w[0].vm_id >= w[1].vm_id)
    {
        return Err(DecodeFault::Corrupt(format!(
            "intents are not sorted by vm_id with one per VM ({} before {})",
            w[0].vm_id, w[1].vm_id
        )));
    }
    Ok(checkpoint)
}

#[cfg(test)]
mod tests;
