//! VM discovery from procfs.
//!
//! A VM is a process holding a file descriptor whose link target is
//! `anon_inode:kvm-vm` (every KVM VMM: QEMU, cloud-hypervisor, firecracker,
//! crosvm, the test fixture). KVM numbers its vCPUs by the fds
//! `anon_inode:kvm-vcpu:N`; fds belong to the process, not to a thread, so the
//! vCPU index of each thread is found by these rules, in order:
//!
//! 1. **Thread name** — QEMU names vCPU threads `CPU N/KVM` when started
//!    with `-name ...,debug-threads=on` (libvirt always sets it); without it
//!    every QEMU thread is named `qemu-system-x86` and rules 2 and 3 apply.
//! 2. **Blocked in `KVM_RUN`** (only when rule 1 matched nothing) —
//!    `/proc/<pid>/task/<tid>/syscall` reads
//!    `16 0xFD 0xae80 ...` while a thread waits in `ioctl(FD, KVM_RUN)` (an
//!    idle, halted vCPU); `FD` is a `kvm-vcpu:N` fd. A thread executing at
//!    that instant reads `running` and is mapped on a later scan.
//! 3. **Thread order** — when the threads left after rules 1 and 2 (not the
//!    main thread, not a kernel or io_uring worker) are exactly as many as the vCPU
//!    indices left without a thread, they are matched in tid order (VMMs
//!    create vCPU threads in index order). Marked [`VcpuMatch::ThreadOrder`]:
//!    a guess the caller can refuse. With any extra thread (an I/O thread)
//!    the counts differ and those vCPUs stay unmatched
//!    ([`DiscoveredVm::unmatched_vcpus`]). Not applied when rule 1 matched
//!    any thread: a VMM that names its vCPU threads has no unnamed ones.
//!
//! Every other thread is an emulator or I/O thread ([`DiscoveredVm::other_threads`]).
//! KVM's kernel workers (`kvm-nx-lpage-re`, flags `PF_USER_WORKER` or
//! `PF_KTHREAD`) are listed in `task/` of the VM process on recent kernels
//! and are excluded from both lists, before rule 2: the NX worker is forked
//! from a vCPU thread and its `syscall` file shows that thread's
//! `ioctl(vcpu fd, KVM_RUN)` (seen with QEMU 7.2 on Linux 6.18). Kernel threads themselves are
//! processes with no fds, so the VM test never matches them.
//!
//! A process or thread that exits during a scan is skipped (logged at debug
//! level); an entry that cannot be parsed is skipped with a `warn!` naming
//! its path.

pub(crate) mod affinity;
pub(crate) mod cgroup_path;
pub(crate) mod cmdline;
// Test and benchmark helper: left out of the daemon's build.
#[cfg(any(test, feature = "testing"))]
pub mod fake_procfs;
pub(crate) mod pidfd;
pub(crate) mod procfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use affinity::{AffinityReader, AffinitySource};
pub use cgroup_path::{
    parse_libvirt_path, parse_proc_cgroup, CgroupLocation, LibvirtCgroup, LibvirtLayout,
};
pub(crate) use cmdline::{classify_cmdline, Classification};
pub use pidfd::VmExitWatch;
use procfs::{LossyText, ProcReadError};

use crate::{ConfidentialClass, CpuSet};

/// The procfs root used when none is configured.
pub(crate) const DEFAULT_PROC_ROOT: &str = "/proc";

/// How a vCPU thread's index was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VcpuMatch {
    /// QEMU's `CPU N/KVM` thread name.
    ThreadName,
    /// The thread was blocked in `ioctl(kvm-vcpu:N fd, KVM_RUN)`.
    KvmRunSyscall,
    /// Matched by tid order (rule 3 of the module documentation).
    ThreadOrder,
}

/// A vCPU thread of a VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuThread {
    /// KVM's vCPU index (`kvm-vcpu:N`, QEMU's `CPU N/KVM`).
    pub index: u32,
    /// Thread id.
    pub tid: u32,
    /// The thread's `comm`.
    pub comm: String,
    /// `Cpus_allowed_list` from `task/<tid>/status`.
    pub cpus_allowed: CpuSet,
    /// The CPU the thread last ran on (stat field 39).
    pub(crate) last_cpu: Option<u32>,
    /// The thread's own cgroups (libvirt puts each vCPU in `vcpuN`); the
    /// process's own value, shared, when the thread sits where the process
    /// does.
    pub cgroup: Arc<CgroupLocation>,
    /// How the thread was matched to its index.
    pub matched_by: VcpuMatch,
}

/// A non-vCPU thread of a VM (emulator, I/O, RCU, worker threads of the VMM).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThreadInfo {
    /// Thread id.
    pub tid: u32,
    /// The thread's `comm`.
    pub comm: String,
    /// `Cpus_allowed_list` from `task/<tid>/status`.
    pub(crate) cpus_allowed: CpuSet,
    /// The CPU the thread last ran on (stat field 39).
    pub(crate) last_cpu: Option<u32>,
    /// `false` for io_uring workers and tasks with `PF_NO_SETAFFINITY`:
    /// their CPUs follow the cgroup, `sched_setaffinity` is refused.
    pub(crate) affinity_settable: bool,
}

/// A KVM VM process found in procfs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiscoveredVm {
    /// Process id.
    pub pid: u32,
    /// Stat field 22 of the process: with `pid`, identifies it across pid reuse.
    pub start_time: u64,
    /// The process's `comm`.
    pub(crate) comm: String,
    /// The process's command line, one argument an element.
    pub(crate) cmdline: Vec<String>,
    /// vCPU indices KVM knows, from the `kvm-vcpu:N` fds, ascending.
    pub vcpu_fds: Vec<u32>,
    /// vCPU threads whose index was found, by index.
    pub vcpus: Vec<VcpuThread>,
    /// All other threads of the process, kernel workers excluded.
    pub other_threads: Vec<ThreadInfo>,
    /// From the command line; `None` when the VMM is not recognised.
    pub class: Option<ConfidentialClass>,
    /// `-name guest=NAME`.
    pub guest_name: Option<String>,
    /// The libvirt domain: from the libvirt cgroup layout, else the guest
    /// name when the command line carries libvirt's paths
    /// (`/var/lib/libvirt/` or `/run/libvirt/`).
    pub libvirt_domain: Option<String>,
    /// The cgroups of the main thread.
    pub cgroup: Arc<CgroupLocation>,
}

impl DiscoveredVm {
    /// vCPU indices with a `kvm-vcpu` fd but no thread found for them.
    pub fn unmatched_vcpus(&self) -> Vec<u32> {
        self.vcpu_fds
            .iter()
            .copied()
            .filter(|i| !self.vcpus.iter().any(|v| v.index == *i))
            .collect()
    }
}

/// A process skipped by a scan because its procfs files could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SkippedEntry {
    pub(crate) pid: u32,
    /// The error, naming the file.
    pub(crate) error: String,
}

/// The result of [`VmScanner::scan_with_outcome`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ScanOutcome {
    pub(crate) vms: Vec<DiscoveredVm>,
    /// Process directories looked at.
    pub(crate) processes: usize,
    /// Processes that exited during the scan (normal).
    pub(crate) exited: usize,
    /// Processes whose fds could not be read (EACCES/EPERM: not root).
    pub(crate) not_readable: usize,
    /// Processes skipped for garbage or I/O errors (each logged with `warn!`).
    pub(crate) skipped: Vec<SkippedEntry>,
}

/// Errors from discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The procfs root itself cannot be listed.
    #[error("cannot list procfs root {path}: {source}")]
    ProcRoot {
        /// The procfs root.
        path: PathBuf,
        /// What listing it returned.
        source: std::io::Error,
    },
    /// The process exited (or its pid now names another process).
    #[error("process {pid} is gone ({path})")]
    VmGone {
        /// The process.
        pid: u32,
        /// Its procfs directory.
        path: PathBuf,
    },
    /// The process holds no `kvm-vm` fd.
    #[error("process {pid} is not a KVM VM: no anon_inode:kvm-vm fd under {path}")]
    NotAVm {
        /// The process.
        pid: u32,
        /// Its `fd` directory.
        path: PathBuf,
    },
    /// EACCES/EPERM on a procfs file.
    #[error("{path}: permission denied")]
    Permission {
        /// The file.
        path: PathBuf,
    },
    /// A procfs file with unexpected content.
    #[error("{path}: {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with the content.
        what: String,
    },
    /// Any other I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What reading it returned.
        source: std::io::Error,
    },
}

impl DiscoveryError {
    fn from_proc(pid: u32, e: ProcReadError) -> Self {
        match e {
            ProcReadError::Gone { path } => Self::VmGone { pid, path },
            ProcReadError::Permission { path } => Self::Permission { path },
            ProcReadError::Malformed { path, what } => Self::Malformed { path, what },
            ProcReadError::Io { path, source } => Self::Io { path, source },
        }
    }

    /// The process exited: a normal event, not a fault.
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::VmGone { .. })
    }
}

/// Passes between two full rescans when none is configured.
pub(crate) const DEFAULT_FULL_RESCAN_EVERY: u32 = 10;

/// Passes after its first sighting during which a process that holds no
/// `kvm-vm` fd is inspected again (a VMM opens its VM fd shortly after it
/// starts); after them it waits for the next full rescan.
const NOT_A_VM_RECHECKS: u32 = 3;

/// Scans a procfs tree for KVM VMs, reading only what changed: a process
/// already identified as a VM (same pid and start time) keeps its fds,
/// command line and cgroups from the scan that identified it and only has
/// its threads re-listed; a thread already seen keeps its name, flags and
/// cgroups (its `stat` is read on its first [`THREAD_STAT_READS`] sightings,
/// while a VMM may still rename it) and has only its affinity read; a
/// process found not to be a VM is not opened again until the next full
/// rescan. Every `full_rescan_every` scans (the first included) everything
/// is read again, to catch what the shortcuts miss (a vCPU fd opened later,
/// a process that became a VM late, a moved cgroup, a thread's last CPU).
/// Clones share the cache.
#[derive(Debug, Clone)]
pub struct VmScanner {
    proc_root: PathBuf,
    full_rescan_every: u32,
    affinity: std::sync::Arc<dyn AffinityReader>,
    cache: std::sync::Arc<std::sync::Mutex<ScanCache>>,
}

/// Sightings of a thread on which its `stat` is read (name, flags, start
/// time, last CPU); after them it is read again at the next full rescan.
/// QEMU names a vCPU thread right after creating it, so a thread first seen
/// under its parent's name shows its own name on a later sighting.
pub(crate) const THREAD_STAT_READS: u32 = 3;

/// What earlier scans learned.
#[derive(Debug, Default)]
struct ScanCache {
    scans: u64,
    /// pid -> the identified VM (its start time tells pid reuse).
    vms: BTreeMap<u32, Identity>,
    /// pid -> scans since it was first found not to be a VM.
    not_vms: BTreeMap<u32, u32>,
}

impl Default for VmScanner {
    fn default() -> Self {
        Self::new(DEFAULT_PROC_ROOT)
    }
}

/// What identifies a VM process and does not change while it runs (kept
/// across scans until the next full rescan).
#[derive(Debug, Clone)]
struct Identity {
    start_time: u64,
    fds: KvmFds,
    cmdline: Vec<String>,
    cgroup: Arc<CgroupLocation>,
    classification: Classification,
    /// What earlier scans read of each thread, in tid order (a vector, not
    /// a map: it is rebuilt in tid order on every listing and holds no
    /// node slack, the bulk of the scanner's memory on a host of many VMs).
    threads: Vec<KnownThread>,
}

/// A thread as earlier scans read it.
#[derive(Debug, Clone)]
struct KnownThread {
    tid: u32,
    /// With the tid, tells a thread that replaced an exited one.
    start_time: u64,
    stat: procfs::TaskStat,
    /// Shared with the process's identity when equal to it.
    cgroup: Arc<CgroupLocation>,
    /// `stat` reads so far (up to [`THREAD_STAT_READS`]).
    stat_reads: u32,
    /// The vCPU index rule 2 found for this thread (it does not change).
    kvm_run_index: Option<u32>,
}

/// The KVM fds of a process.
#[derive(Debug, Clone)]
struct KvmFds {
    has_vm: bool,
    /// fd number -> vCPU index.
    vcpus: BTreeMap<u32, u32>,
}

impl VmScanner {
    /// A scanner of `proc_root`; thread affinity is read with
    /// `sched_getaffinity` when the root is a mounted procfs and from
    /// `status` files otherwise ([`AffinitySource::for_root`]).
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        let proc_root = proc_root.into();
        let affinity = AffinitySource::for_root(&proc_root).reader();
        Self {
            proc_root,
            full_rescan_every: DEFAULT_FULL_RESCAN_EVERY,
            affinity,
            cache: Default::default(),
        }
    }

    /// Sets the passes between two full rescans (1: every scan is full).
    pub fn with_full_rescan_every(mut self, every: u32) -> Self {
        self.full_rescan_every = every.max(1);
        self
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ScanCache> {
        // The cache holds no invariant a panicking scan could break.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The procfs root the scanner reads (`<host root>/proc`).
    pub(crate) fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// Every KVM VM process under the root. Processes that vanish or cannot
    /// be read are skipped and logged; only an unreadable root is an error.
    pub fn scan(&self) -> Result<Vec<DiscoveredVm>, DiscoveryError> {
        self.scan_with_outcome().map(|o| o.vms)
    }

    /// [`Self::scan`], also reporting what was skipped (for metrics and
    /// events).
    pub(crate) fn scan_with_outcome(&self) -> Result<ScanOutcome, DiscoveryError> {
        // The names of the root are enough to compare with the known set;
        // `procfs::process::all_processes_with_root` would open every
        // process directory on every pass.
        let entries =
            std::fs::read_dir(&self.proc_root).map_err(|source| DiscoveryError::ProcRoot {
                path: self.proc_root.clone(),
                source,
            })?;
        let mut pids: Vec<u32> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        pids.sort_unstable();
        let mut cache = self.cache();
        let full = cache.scans % u64::from(self.full_rescan_every) == 0;
        cache.scans += 1;
        if full {
            cache.vms.clear();
            cache.not_vms.clear();
        } else {
            cache.vms.retain(|pid, _| pids.binary_search(pid).is_ok());
            cache
                .not_vms
                .retain(|pid, _| pids.binary_search(pid).is_ok());
        }
        let mut out = ScanOutcome::default();
        for pid in pids {
            out.processes += 1;
            if let Some(seen) = cache.not_vms.get_mut(&pid) {
                if *seen >= NOT_A_VM_RECHECKS {
                    continue;
                }
                *seen += 1;
            }
            let known = cache.vms.remove(&pid);
            match self.read_vm(pid, known) {
                Ok((vm, id)) => {
                    cache.not_vms.remove(&pid);
                    cache.vms.insert(pid, id);
                    out.vms.push(vm);
                }
                Err(DiscoveryError::NotAVm { .. }) => {
                    cache.not_vms.entry(pid).or_insert(0);
                }
                Err(e @ DiscoveryError::VmGone { .. }) => {
                    out.exited += 1;
                    tracing::debug!(pid, error = %e, "process exited during scan");
                }
                Err(e @ DiscoveryError::Permission { .. }) => {
                    out.not_readable += 1;
                    tracing::debug!(pid, error = %e, "process not readable");
                }
                Err(e) => {
                    tracing::warn!(pid, error = %e, "skipping unreadable procfs entry");
                    out.skipped.push(SkippedEntry {
                        pid,
                        error: e.to_string(),
                    });
                }
            }
        }
        Ok(out)
    }

    fn pid_dir(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string())
    }

    /// The KVM fds of `pid`, read by hand: the `procfs` crate's `FDTarget`
    /// splits a link target at every `:`, so `anon_inode:kvm-vcpu:3` becomes
    /// `AnonInode("kvm-vcpu")` and the vCPU index is lost.
    fn kvm_fds(&self, pid: u32) -> Result<KvmFds, DiscoveryError> {
        let dir = self.pid_dir(pid).join("fd");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| DiscoveryError::from_proc(pid, ProcReadError::from_io(&dir, e)))?;
        let mut fds = KvmFds {
            has_vm: false,
            vcpus: BTreeMap::new(),
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            // An fd closed between readdir and readlink is skipped.
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if procfs::is_vm_fd(&target) {
                fds.has_vm = true;
            } else if let Some(index) = procfs::vcpu_fd_index(&target) {
                if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                    fds.vcpus.insert(fd, index);
                }
            }
        }
        Ok(fds)
    }

    /// Whether `pid` is still the process that started at `start_time`.
    pub fn is_same_process(&self, pid: u32, start_time: u64) -> Result<bool, DiscoveryError> {
        match procfs::read_task_stat(&self.proc_root, pid, pid) {
            Ok(st) => Ok(st.start_time == start_time),
            Err(ProcReadError::Gone { .. }) => Ok(false),
            Err(e) => Err(DiscoveryError::from_proc(pid, e)),
        }
    }

    /// Inspects one process, reading everything. `NotAVm` when it holds no
    /// `kvm-vm` fd, `VmGone` when it exited.
    pub fn inspect(&self, pid: u32) -> Result<DiscoveredVm, DiscoveryError> {
        self.read_vm(pid, None).map(|(vm, _)| vm)
    }

    /// The process as of now. A known VM (`known`) keeps its identity when
    /// its main thread's start time is unchanged; a different one means the
    /// pid was reused and the process is identified from scratch.
    fn read_vm(
        &self,
        pid: u32,
        known: Option<Identity>,
    ) -> Result<(DiscoveredVm, Identity), DiscoveryError> {
        let process = self.open_process(pid)?;
        let (mut id, main) = match known {
            Some(id) => {
                let main = self.read_stat(pid, &process)?;
                if main.start_time == id.start_time {
                    (id, main)
                } else {
                    self.identify(pid, &process)?
                }
            }
            None => self.identify(pid, &process)?,
        };
        let vm = self.assemble(pid, &process, &mut id, main)?;
        Ok((vm, id))
    }

    /// Opens `/proc/<pid>` with the `procfs` crate (one directory handle the
    /// reads below are relative to).
    fn open_process(&self, pid: u32) -> Result<::procfs::process::Process, DiscoveryError> {
        let dir = self.pid_dir(pid);
        ::procfs::process::Process::new_with_root(dir.clone())
            .map_err(|e| DiscoveryError::from_proc(pid, procfs::from_procfs_error(&dir, e)))
    }

    /// A file of the process, as text.
    fn read_process_file(
        &self,
        process: &::procfs::process::Process,
        pid: u32,
        file: &str,
    ) -> Result<String, ProcReadError> {
        process
            .read::<LossyText>(file)
            .map(|t| t.0)
            .map_err(|e| procfs::from_procfs_error(&self.pid_dir(pid).join(file), e))
    }

    /// A file of thread `tid`, as text.
    fn read_task_file(
        &self,
        process: &::procfs::process::Process,
        pid: u32,
        tid: u32,
        file: &str,
    ) -> Result<String, ProcReadError> {
        let path = || procfs::task_file(&self.proc_root, pid, tid, file);
        let task = process
            .task_from_tid(i32::try_from(tid).map_err(|_| ProcReadError::Gone { path: path() })?)
            .map_err(|e| procfs::from_procfs_error(&path(), e))?;
        task.read::<LossyText>(file)
            .map(|t| t.0)
            .map_err(|e| procfs::from_procfs_error(&path(), e))
    }

    /// `task/<tid>/cgroup`, parsed; empty when not readable (a thread of
    /// another user's process).
    fn read_thread_cgroup(
        &self,
        process: &::procfs::process::Process,
        pid: u32,
        tid: u32,
    ) -> Result<CgroupLocation, ProcReadError> {
        match self.read_task_file(process, pid, tid, "cgroup") {
            Ok(text) => parse_proc_cgroup(&text).map_err(|e| ProcReadError::Malformed {
                path: procfs::task_file(&self.proc_root, pid, tid, "cgroup"),
                what: e.to_string(),
            }),
            Err(ProcReadError::Permission { .. }) => Ok(CgroupLocation::default()),
            Err(e) => Err(e),
        }
    }

    /// `task/<tid>/stat`, parsed.
    fn read_task_stat(
        &self,
        process: &::procfs::process::Process,
        pid: u32,
        tid: u32,
    ) -> Result<procfs::TaskStat, ProcReadError> {
        let text = self.read_task_file(process, pid, tid, "stat")?;
        procfs::parse_stat(&text).map_err(|what| ProcReadError::Malformed {
            path: procfs::task_file(&self.proc_root, pid, tid, "stat"),
            what,
        })
    }

    /// `<pid>/stat` of the process, parsed.
    fn read_stat(
        &self,
        pid: u32,
        process: &::procfs::process::Process,
    ) -> Result<procfs::TaskStat, DiscoveryError> {
        let path = self.pid_dir(pid).join("stat");
        let text = self
            .read_process_file(process, pid, "stat")
            .map_err(|e| DiscoveryError::from_proc(pid, e))?;
        procfs::parse_stat(&text).map_err(|what| DiscoveryError::Malformed { path, what })
    }

    /// Reads what identifies a VM process: its KVM fds, command line and
    /// cgroups; with the main thread's stat.
    fn identify(
        &self,
        pid: u32,
        process: &::procfs::process::Process,
    ) -> Result<(Identity, procfs::TaskStat), DiscoveryError> {
        let fds = self.kvm_fds(pid)?;
        if !fds.has_vm {
            return Err(DiscoveryError::NotAVm {
                pid,
                path: self.pid_dir(pid).join("fd"),
            });
        }
        let err = |e| DiscoveryError::from_proc(pid, e);
        let main = self.read_stat(pid, process)?;
        // `Process::cmdline` drops the arguments' non-UTF-8 bytes with the
        // whole file; the command line is parsed here, lossily.
        let cmdline = cmdline::parse_proc_cmdline(
            &self
                .read_process_file(process, pid, "cmdline")
                .map_err(err)?,
        );
        let cgroup_path = self.pid_dir(pid).join("cgroup");
        // `Process::cgroups` gives the lines; the libvirt layout and the v1
        // cpuset mount are recognised by `parse_proc_cgroup`.
        let cgroup_text = self
            .read_process_file(process, pid, "cgroup")
            .map_err(err)?;
        let cgroup = parse_proc_cgroup(&cgroup_text).map(Arc::new).map_err(|e| {
            DiscoveryError::Malformed {
                path: cgroup_path.clone(),
                what: e.to_string(),
            }
        })?;
        let classification = classify_cmdline(&cmdline);
        let id = Identity {
            start_time: main.start_time,
            fds,
            cmdline,
            cgroup,
            classification,
            threads: Vec::new(),
        };
        Ok((id, main))
    }

    /// The VM as of now: its threads listed and matched to vCPUs with the
    /// fds of `id`.
    fn assemble(
        &self,
        pid: u32,
        process: &::procfs::process::Process,
        id: &mut Identity,
        main: procfs::TaskStat,
    ) -> Result<DiscoveredVm, DiscoveryError> {
        let threads = self.threads(pid, process, &id.cgroup, &mut id.threads)?;
        let fds = &id.fds;
        let cmdline = id.cmdline.clone();
        let cgroup = Arc::clone(&id.cgroup);
        let classification = id.classification.clone();

        let mut vcpus: Vec<VcpuThread> = Vec::new();
        let mut rest: Vec<ThreadRecord> = Vec::new();
        // Rule 1: QEMU thread names.
        for t in threads {
            match qemu_vcpu_index(&t.stat.comm) {
                Some(index) if !vcpus.iter().any(|v| v.index == index) => {
                    vcpus.push(t.into_vcpu(index, VcpuMatch::ThreadName));
                }
                _ => rest.push(t),
            }
        }
        let vcpu_fds: Vec<u32> = {
            let mut v: Vec<u32> = fds.vcpus.values().copied().collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        // A VMM that names its vCPU threads (QEMU) has no unnamed vCPUs:
        // rules 2 and 3 apply only when rule 1 matched nothing.
        let named = !vcpus.is_empty();
        // Rule 2: threads blocked in KVM_RUN on a vCPU fd.
        let mut unmatched: Vec<ThreadRecord> = Vec::new();
        for t in rest {
            let syscall = if named {
                None
            } else {
                t.kvm_run_index.or_else(|| {
                    self.read_task_file(process, pid, t.tid, "syscall")
                        .ok()
                        .and_then(|s| procfs::parse_syscall_kvm_run_fd(&s))
                        .and_then(|fd| fds.vcpus.get(&fd).copied())
                })
            };
            match syscall {
                Some(index) if t.tid != pid && !vcpus.iter().any(|v| v.index == index) => {
                    if let Ok(k) = id.threads.binary_search_by_key(&t.tid, |k| k.tid) {
                        id.threads[k].kvm_run_index = Some(index);
                    }
                    vcpus.push(t.into_vcpu(index, VcpuMatch::KvmRunSyscall));
                }
                _ => unmatched.push(t),
            }
        }
        // Rule 3: tid order, only when the remaining candidate threads and
        // the unmatched vCPU indices are equal in number.
        let candidates: Vec<usize> = unmatched
            .iter()
            .enumerate()
            .filter(|(_, t)| t.tid != pid && t.stat.affinity_settable())
            .map(|(i, _)| i)
            .collect();
        let open_indices: Vec<u32> = vcpu_fds
            .iter()
            .copied()
            .filter(|i| !vcpus.iter().any(|v| v.index == *i))
            .collect();
        let mut other_threads = Vec::new();
        if !named && !open_indices.is_empty() && candidates.len() == open_indices.len() {
            for (n, t) in unmatched.into_iter().enumerate() {
                match candidates.iter().position(|&c| c == n) {
                    Some(k) => vcpus.push(t.into_vcpu(open_indices[k], VcpuMatch::ThreadOrder)),
                    None => other_threads.push(t.into_info()),
                }
            }
        } else {
            other_threads.extend(unmatched.into_iter().map(ThreadRecord::into_info));
        }
        vcpus.sort_by_key(|v| v.index);

        let libvirt_domain = cgroup
            .libvirt
            .as_ref()
            .map(|lv| match &classification.guest_name {
                // The cgroup may carry a shortened name; the full one is on the command line.
                Some(g) if g.starts_with(&lv.domain_name) => g.clone(),
                _ => lv.domain_name.clone(),
            })
            .or_else(|| {
                let libvirt_launched = cmdline
                    .iter()
                    .any(|a| a.contains("/var/lib/libvirt/") || a.contains("/run/libvirt/"));
                if libvirt_launched {
                    classification.guest_name.clone()
                } else {
                    None
                }
            });

        Ok(DiscoveredVm {
            pid,
            start_time: main.start_time,
            comm: main.comm,
            cmdline,
            vcpu_fds,
            vcpus,
            other_threads,
            class: classification.class,
            guest_name: classification.guest_name,
            libvirt_domain,
            cgroup,
        })
    }

    /// The process's threads with their stat, affinity and cgroup, kernel
    /// workers excluded, in tid order. A thread in `known` (same tid and,
    /// when its stat is read, same start time) has only its affinity read
    /// once its stat was read [`THREAD_STAT_READS`] times. Threads that exit
    /// meanwhile are skipped; the main thread exiting means the VM is gone.
    fn threads(
        &self,
        pid: u32,
        process: &::procfs::process::Process,
        process_cgroup: &Arc<CgroupLocation>,
        known: &mut Vec<KnownThread>,
    ) -> Result<Vec<ThreadRecord>, DiscoveryError> {
        let root = &self.proc_root;
        // Names only: `Process::tasks` opens every task directory, and a
        // known thread needs nothing but its tid for its affinity.
        let dir = self.pid_dir(pid).join("task");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| DiscoveryError::from_proc(pid, ProcReadError::from_io(&dir, e)))?;
        let mut tids: Vec<u32> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        tids.sort_unstable();
        // Both lists are in tid order: one merge walk pairs each listed tid
        // with what was known of it, and drops the threads that exited.
        let mut previous = std::mem::take(known).into_iter().peekable();
        let mut kept: Vec<KnownThread> = Vec::with_capacity(tids.len());
        let mut out = Vec::with_capacity(tids.len());
        for tid in tids {
            while previous.next_if(|k| k.tid < tid).is_some() {}
            let before = previous.next_if(|k| k.tid == tid);
            let read = || -> Result<(KnownThread, Option<ThreadRecord>), ProcReadError> {
                let entry = match before {
                    Some(k) if k.stat_reads >= THREAD_STAT_READS => k,
                    before => {
                        let stat = self.read_task_stat(process, pid, tid)?;
                        match before {
                            Some(mut k) if k.start_time == stat.start_time => {
                                k.stat = stat;
                                k.stat_reads += 1;
                                k
                            }
                            // New, or a new thread under an exited one's tid.
                            _ => {
                                let cgroup = self.read_thread_cgroup(process, pid, tid)?;
                                KnownThread {
                                    tid,
                                    start_time: stat.start_time,
                                    stat,
                                    cgroup: if cgroup == **process_cgroup {
                                        Arc::clone(process_cgroup)
                                    } else {
                                        Arc::new(cgroup)
                                    },
                                    stat_reads: 1,
                                    kvm_run_index: None,
                                }
                            }
                        }
                    }
                };
                if entry.stat.is_kernel_worker() {
                    return Ok((entry, None));
                }
                let cpus_allowed = self.affinity.cpus_allowed(root, pid, tid)?;
                let record = ThreadRecord {
                    tid,
                    stat: entry.stat.clone(),
                    cpus_allowed,
                    cgroup: Arc::clone(&entry.cgroup),
                    kvm_run_index: entry.kvm_run_index,
                };
                Ok((entry, Some(record)))
            };
            match read() {
                Ok((entry, record)) => {
                    kept.push(entry);
                    out.extend(record);
                }
                Err(ProcReadError::Gone { path }) if tid == pid => {
                    return Err(DiscoveryError::VmGone { pid, path });
                }
                Err(ProcReadError::Gone { path }) => {
                    tracing::debug!(pid, tid, path = %path.display(), "thread exited during scan");
                }
                Err(e) if tid == pid => return Err(DiscoveryError::from_proc(pid, e)),
                Err(e) => {
                    tracing::warn!(pid, tid, error = %e, "skipping unreadable thread");
                }
            }
        }
        *known = kept;
        Ok(out)
    }
}

/// One thread as read from procfs, before classification.
struct ThreadRecord {
    tid: u32,
    stat: procfs::TaskStat,
    cpus_allowed: CpuSet,
    cgroup: Arc<CgroupLocation>,
    kvm_run_index: Option<u32>,
}

impl ThreadRecord {
    fn into_vcpu(self, index: u32, matched_by: VcpuMatch) -> VcpuThread {
        VcpuThread {
            index,
            tid: self.tid,
            comm: self.stat.comm,
            cpus_allowed: self.cpus_allowed,
            last_cpu: self.stat.last_cpu,
            cgroup: self.cgroup,
            matched_by,
        }
    }

    fn into_info(self) -> ThreadInfo {
        ThreadInfo {
            tid: self.tid,
            affinity_settable: self.stat.affinity_settable(),
            comm: self.stat.comm,
            cpus_allowed: self.cpus_allowed,
            last_cpu: self.stat.last_cpu,
        }
    }
}

/// The vCPU index in a QEMU vCPU thread name `CPU N/KVM`.
pub(crate) fn qemu_vcpu_index(comm: &str) -> Option<u32> {
    comm.strip_prefix("CPU ")?
        .strip_suffix("/KVM")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests;

/// A procfs read error as the [`crate::cgroup::CgroupError`] of the pin it
/// checks.
fn proc_err(e: ProcReadError) -> crate::cgroup::CgroupError {
    match e {
        ProcReadError::Gone { path } => crate::cgroup::CgroupError::VmGone {
            target: crate::cgroup::Target::File(path),
        },
        ProcReadError::Permission { path } => crate::cgroup::CgroupError::Permission {
            target: crate::cgroup::Target::File(path),
            value: String::new(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32),
        },
        ProcReadError::Malformed { path, what } => crate::cgroup::CgroupError::Malformed {
            target: crate::cgroup::Target::File(path),
            what,
        },
        ProcReadError::Io { path, source } => crate::cgroup::CgroupError::Io {
            target: crate::cgroup::Target::File(path),
            value: String::new(),
            source,
        },
    }
}

/// Reads back `Cpus_allowed_list` of thread `tid` of process `pid` from a
/// procfs root: the set the kernel enforces (affinity within the cpuset).
pub fn read_thread_cpus_allowed(
    proc_root: &Path,
    pid: u32,
    tid: u32,
) -> Result<CpuSet, crate::cgroup::CgroupError> {
    procfs::read_cpus_allowed(proc_root, pid, tid).map_err(proc_err)
}

/// Reads the CPU thread `tid` last ran on (stat field 39).
pub fn read_thread_last_cpu(
    proc_root: &Path,
    pid: u32,
    tid: u32,
) -> Result<Option<u32>, crate::cgroup::CgroupError> {
    procfs::read_last_cpu(proc_root, pid, tid).map_err(proc_err)
}
