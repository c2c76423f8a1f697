//! cpuset enforcement: cgroup v1 and v2 cpusets, and `sched_setaffinity`.
//!
//! The cgroupfs root is a parameter (default `/sys/fs/cgroup`).
//! [`CgroupHost::detect`] finds the cpuset controller:
//! - cgroup v2 when `<root>/cgroup.controllers` exists (a pure unified
//!   mount), or when `<root>/unified/cgroup.controllers` lists `cpuset`
//!   (a hybrid host that gave cpuset to v2);
//! - cgroup v1 when `<root>/cpuset/cpuset.cpus` exists.
//!
//! [`CpusetWriter`] writes in the order the kernel requires:
//! - v1: a new cgroup has empty `cpuset.cpus` and `cpuset.mems`, and
//!   attaching a task to it fails with `ENOSPC`; a child's set must be a
//!   subset of its parent's (`EINVAL` otherwise). So every missing ancestor
//!   is created and given its parent's CPUs and memory nodes, an ancestor
//!   that lacks a requested CPU is widened, top-down, and only then the
//!   target's `cpuset.mems` and `cpuset.cpus` are written and threads are
//!   moved by writing their tids to `tasks`.
//! - v2: `+cpuset` is enabled in `cgroup.subtree_control` of every ancestor,
//!   top-down; a thread-level child gets `cgroup.type` = `threaded` before
//!   its parent enables `+cpuset` for it; then `cpuset.cpus` is written and
//!   threads are moved through `cgroup.threads` (processes through
//!   `cgroup.procs`).
//!
//! VMs with no cgroup of their own are pinned per thread with
//! `sched_setaffinity` ([`set_thread_affinity`]).

pub mod enforce;

use std::path::{Component, Path, PathBuf};

use crate::discovery::procfs::{self, ProcReadError};
use crate::discovery::Hierarchy;
use crate::{CpuSet, VmId};

pub use enforce::{AffinityFn, PinMethod, PinReport, VcpuEnforcer};

/// The cgroupfs mount point used when none is configured.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The top of the agent-owned layout `sevplace/vm-<id>/vcpuN`.
pub const AGENT_CGROUP_BASE: &str = "/sevplace";

/// Errors from cpuset and affinity writes. `target` names the file written
/// or the system call and thread.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The thread or process exited (ESRCH, or ENOENT on a thread).
    #[error("{target}: thread or process is gone")]
    VmGone { target: String },
    /// EACCES or EPERM (delegation, containers, not root).
    #[error("{target}: permission denied ({source})")]
    Permission {
        target: String,
        source: std::io::Error,
    },
    /// The set is not allowed here: EINVAL (no online CPU, not a cpulist,
    /// outside the cpuset for `sched_setaffinity`), or a v1 set that is not
    /// a subset of the parent's (the kernel returns EACCES for that;
    /// [`CpusetWriter`] tells it apart from a permission error).
    #[error("{target}: invalid CPU set {value:?}: {reason}")]
    InvalidSet {
        target: String,
        value: String,
        reason: String,
    },
    /// EBUSY: a child still uses CPUs being removed, or a v2 cgroup with
    /// processes cannot enable controllers ("no internal processes").
    #[error("{target}: busy ({source})")]
    Busy {
        target: String,
        source: std::io::Error,
    },
    /// ENOSPC: v1 attach to a cgroup whose `cpuset.cpus` or `cpuset.mems`
    /// is empty.
    #[error("{target}: cpuset.cpus or cpuset.mems is empty ({source})")]
    NoSpace {
        target: String,
        source: std::io::Error,
    },
    /// The cgroup directory or file does not exist (ENOENT, not on a thread).
    #[error("{target}: no such cgroup or file")]
    Missing { target: String },
    /// No cpuset controller under the root.
    #[error("no cpuset controller under {root}: neither {root}/cgroup.controllers (v2) nor {root}/cpuset/cpuset.cpus (v1) is usable")]
    NoCpuset { root: PathBuf },
    /// A cgroup path with `..` or other non-normal components.
    #[error("cgroup path {path:?} must be absolute within the hierarchy, without '..'")]
    BadPath { path: String },
    /// A file with unexpected content.
    #[error("{target}: {what}")]
    Malformed { target: String, what: String },
    /// Any other I/O error.
    #[error("{target}: {source}")]
    Io {
        target: String,
        source: std::io::Error,
    },
}

impl CgroupError {
    /// Maps an errno from a write of `value` to `target`. `on_thread`: the
    /// operation names a thread, so ENOENT means the thread is gone.
    fn from_io(target: &Path, value: &str, on_thread: bool, e: std::io::Error) -> Self {
        Self::from_io_named(target.display().to_string(), value, on_thread, e)
    }

    fn from_io_named(target: String, value: &str, on_thread: bool, e: std::io::Error) -> Self {
        use nix::errno::Errno;
        let errno = e.raw_os_error().map(Errno::from_raw);
        match errno {
            Some(Errno::ESRCH) => Self::VmGone { target },
            Some(Errno::ENOENT) if on_thread => Self::VmGone { target },
            Some(Errno::ENOENT) => Self::Missing { target },
            Some(Errno::EACCES) | Some(Errno::EPERM) => Self::Permission { target, source: e },
            Some(Errno::EINVAL) => Self::InvalidSet {
                target,
                value: value.to_string(),
                reason: e.to_string(),
            },
            Some(Errno::EBUSY) => Self::Busy { target, source: e },
            Some(Errno::ENOSPC) => Self::NoSpace { target, source: e },
            _ => Self::Io { target, source: e },
        }
    }

    /// A short stable name of the error kind, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::VmGone { .. } => "gone",
            Self::Permission { .. } => "permission",
            Self::InvalidSet { .. } => "invalid_set",
            Self::Busy { .. } => "busy",
            Self::NoSpace { .. } => "no_space",
            Self::Missing { .. } => "missing",
            Self::NoCpuset { .. } => "no_cpuset",
            Self::BadPath { .. } => "bad_path",
            Self::Malformed { .. } => "malformed",
            Self::Io { .. } => "io",
        }
    }

    /// The thread or VM exited: release, do not retry.
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::VmGone { .. })
    }
}

/// Whether `cgroup.subtree_control` enables `cpuset` (its words may carry
/// a `+`).
pub fn lists_cpuset(text: &str) -> bool {
    text.split_whitespace()
        .any(|w| w.trim_start_matches('+') == "cpuset")
}

/// Parses a thread or process id list (`tasks`, `cgroup.threads`,
/// `cgroup.procs`): one id per line, blank lines skipped; the error names
/// the first line that is not an id.
pub fn parse_thread_ids(text: &str) -> Result<Vec<u32>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| format!("{l:?} is not a thread id"))
        })
        .collect()
}

/// Where the cpuset controller is on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupHost {
    pub hierarchy: Hierarchy,
    /// The directory of the hierarchy's root cgroup.
    pub mount: PathBuf,
}

impl CgroupHost {
    /// Detects the cpuset hierarchy under `root` (see the module docs).
    pub fn detect(root: impl AsRef<Path>) -> Result<Self, CgroupError> {
        let root = root.as_ref();
        if root.join("cgroup.controllers").is_file() {
            return Ok(Self {
                hierarchy: Hierarchy::Unified,
                mount: root.to_path_buf(),
            });
        }
        let unified = root.join("unified");
        if let Ok(c) = std::fs::read_to_string(unified.join("cgroup.controllers")) {
            if c.split_whitespace().any(|w| w == "cpuset") {
                return Ok(Self {
                    hierarchy: Hierarchy::Unified,
                    mount: unified,
                });
            }
        }
        let v1 = root.join("cpuset");
        if v1.join("cpuset.cpus").is_file() {
            return Ok(Self {
                hierarchy: Hierarchy::V1Cpuset,
                mount: v1,
            });
        }
        Err(CgroupError::NoCpuset {
            root: root.to_path_buf(),
        })
    }
}

/// One write made to cgroupfs, in the order it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupWrite {
    pub file: PathBuf,
    pub value: String,
}

/// Whether a cgroup holds whole processes or single threads (v2 only; v1
/// moves threads to any cgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupKind {
    /// A domain cgroup (`cgroup.procs`).
    Domain,
    /// A `threaded` cgroup inside a threaded subtree (`cgroup.threads`).
    Threaded,
}

/// Writes cpusets in one cgroup hierarchy (v1 or v2).
#[derive(Debug, Clone)]
pub struct CpusetWriter {
    host: CgroupHost,
    /// Top of the agent-owned layout, default [`AGENT_CGROUP_BASE`].
    agent_base: String,
}

impl CpusetWriter {
    pub fn new(host: CgroupHost) -> Self {
        Self {
            host,
            agent_base: AGENT_CGROUP_BASE.to_string(),
        }
    }

    /// Uses `base` (a cgroup path such as `/sevplace`) as the top of the
    /// agent-owned layout.
    pub fn with_agent_base(mut self, base: &str) -> Self {
        self.agent_base = format!("/{}", base.trim_matches('/'));
        self
    }

    /// The agent-owned cgroup of `vm`: `<base>/vm-<id>`.
    pub fn agent_vm_cgroup(&self, vm: &VmId) -> String {
        format!("{}/vm-{vm}", self.agent_base)
    }

    /// The agent-owned cgroup of vCPU `index` of `vm`: `<base>/vm-<id>/vcpuN`.
    pub fn agent_vcpu_cgroup(&self, vm: &VmId, index: u32) -> String {
        format!("{}/vcpu{index}", self.agent_vm_cgroup(vm))
    }

    /// The agent-owned cgroup of `vm`'s emulator threads (v1 layout).
    pub fn agent_emulator_cgroup(&self, vm: &VmId) -> String {
        format!("{}/emulator", self.agent_vm_cgroup(vm))
    }

    /// Detects the hierarchy under `root` and returns a writer for it.
    pub fn detect(root: impl AsRef<Path>) -> Result<Self, CgroupError> {
        CgroupHost::detect(root).map(Self::new)
    }

    pub fn host(&self) -> &CgroupHost {
        &self.host
    }

    pub fn hierarchy(&self) -> Hierarchy {
        self.host.hierarchy
    }

    /// The directory of `cgroup` (a path like `/machine.slice/x.scope`).
    pub fn dir_of(&self, cgroup: &str) -> Result<PathBuf, CgroupError> {
        let rel = Path::new(cgroup.trim_start_matches('/'));
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(CgroupError::BadPath {
                path: cgroup.to_string(),
            });
        }
        Ok(self.host.mount.join(rel))
    }

    fn cpus_file(&self) -> &'static str {
        "cpuset.cpus"
    }

    fn effective_cpus_file(&self) -> &'static str {
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => "cpuset.effective_cpus",
            Hierarchy::Unified => "cpuset.cpus.effective",
        }
    }

    fn write(
        file: &Path,
        value: &str,
        on_thread: bool,
        log: &mut Vec<CgroupWrite>,
    ) -> Result<(), CgroupError> {
        // cgroupfs takes one value per write(2); std::fs::write issues one.
        std::fs::write(file, value).map_err(|e| CgroupError::from_io(file, value, on_thread, e))?;
        tracing::debug!(file = %file.display(), value, "cgroup write");
        log.push(CgroupWrite {
            file: file.to_path_buf(),
            value: value.to_string(),
        });
        Ok(())
    }

    /// Writes a cpulist to `dir/file` (`cpuset.cpus` or `cpuset.mems`). v1
    /// answers EACCES when the set is not a subset of the parent's; that case
    /// is reported as `InvalidSet` naming the parent's set.
    fn write_set(
        &self,
        dir: &Path,
        file: &str,
        set: &CpuSet,
        log: &mut Vec<CgroupWrite>,
    ) -> Result<(), CgroupError> {
        let path = dir.join(file);
        match Self::write(&path, &set.to_string(), false, log) {
            Err(CgroupError::Permission { target, source })
                if self.host.hierarchy == Hierarchy::V1Cpuset && dir != self.host.mount =>
            {
                let parent_set = dir
                    .parent()
                    .and_then(|p| Self::read_set(&p.join(file)).ok());
                match parent_set {
                    Some(p) if !set.is_subset(&p) => Err(CgroupError::InvalidSet {
                        target,
                        value: set.to_string(),
                        reason: format!("not a subset of the parent's {file} {p:?}"),
                    }),
                    _ => Err(CgroupError::Permission { target, source }),
                }
            }
            other => other,
        }
    }

    fn read(file: &Path) -> Result<String, CgroupError> {
        std::fs::read_to_string(file).map_err(|e| CgroupError::from_io(file, "", false, e))
    }

    fn read_set(file: &Path) -> Result<CpuSet, CgroupError> {
        let text = Self::read(file)?;
        CpuSet::parse(text.trim()).map_err(|e| CgroupError::Malformed {
            target: file.display().to_string(),
            what: e.to_string(),
        })
    }

    fn mkdir(dir: &Path) -> Result<bool, CgroupError> {
        match std::fs::create_dir(dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(CgroupError::from_io(dir, "", false, e)),
        }
    }

    /// `cpuset.cpus` of `cgroup` (what was configured).
    pub fn read_cpus(&self, cgroup: &str) -> Result<CpuSet, CgroupError> {
        Self::read_set(&self.dir_of(cgroup)?.join(self.cpus_file()))
    }

    /// The effective CPUs of `cgroup` (configured set within its parents').
    pub fn read_effective_cpus(&self, cgroup: &str) -> Result<CpuSet, CgroupError> {
        Self::read_set(&self.dir_of(cgroup)?.join(self.effective_cpus_file()))
    }

    /// Thread ids in `cgroup` (`tasks` in v1, `cgroup.threads` in v2).
    pub fn read_threads(&self, cgroup: &str) -> Result<Vec<u32>, CgroupError> {
        let file = self.dir_of(cgroup)?.join(self.threads_file());
        let text = Self::read(&file)?;
        parse_thread_ids(&text).map_err(|what| CgroupError::Malformed {
            target: file.display().to_string(),
            what,
        })
    }

    fn threads_file(&self) -> &'static str {
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => "tasks",
            Hierarchy::Unified => "cgroup.threads",
        }
    }

    /// Creates `cgroup` (and its ancestors) and sets its CPUs, in the order
    /// the kernel requires (module docs). `mems` applies to v1 (`None`: the
    /// parent's nodes); v2 leaves `cpuset.mems` empty, which means all nodes
    /// of the parent. Returns the writes made.
    pub fn ensure_cpuset(
        &self,
        cgroup: &str,
        cpus: &CpuSet,
        mems: Option<&CpuSet>,
        kind: CgroupKind,
    ) -> Result<Vec<CgroupWrite>, CgroupError> {
        if cpus.is_empty() {
            return Err(CgroupError::InvalidSet {
                target: cgroup.to_string(),
                value: String::new(),
                reason: "empty CPU set".to_string(),
            });
        }
        let target = self.dir_of(cgroup)?;
        let mut log = Vec::new();
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => self.ensure_v1(&target, cpus, mems, &mut log)?,
            Hierarchy::Unified => self.ensure_v2(&target, cpus, kind, &mut log)?,
        }
        Ok(log)
    }

    /// The chain of directories from the root's child down to `target`.
    fn chain(&self, target: &Path) -> Vec<PathBuf> {
        let mut chain: Vec<PathBuf> = target
            .ancestors()
            .take_while(|p| *p != self.host.mount && p.starts_with(&self.host.mount))
            .map(Path::to_path_buf)
            .collect();
        chain.reverse();
        chain
    }

    fn ensure_v1(
        &self,
        target: &Path,
        cpus: &CpuSet,
        mems: Option<&CpuSet>,
        log: &mut Vec<CgroupWrite>,
    ) -> Result<(), CgroupError> {
        let mut parent = self.host.mount.clone();
        for dir in self.chain(target) {
            Self::mkdir(&dir)?;
            let parent_cpus = Self::read_set(&parent.join("cpuset.cpus"))?;
            let parent_mems = Self::read_set(&parent.join("cpuset.mems"))?;
            let is_target = dir == target;
            // Memory nodes first: a cgroup with CPUs but no nodes still
            // refuses tasks, and mems never constrain the CPU write.
            let cur_mems = Self::read_set(&dir.join("cpuset.mems"))?;
            let want_mems = match (is_target, mems) {
                (true, Some(m)) => m.clone(),
                _ if cur_mems.is_empty() => parent_mems.clone(),
                _ => cur_mems.clone(),
            };
            if want_mems != cur_mems {
                self.write_set(&dir, "cpuset.mems", &want_mems, log)?;
            }
            let cur_cpus = Self::read_set(&dir.join("cpuset.cpus"))?;
            let want_cpus = if is_target {
                cpus.clone()
            } else if cur_cpus.is_empty() {
                parent_cpus.clone()
            } else if !cpus.is_subset(&cur_cpus) {
                // Widen an ancestor that lacks a requested CPU, within its parent.
                cur_cpus.union(&cpus.intersection(&parent_cpus))
            } else {
                cur_cpus.clone()
            };
            if want_cpus != cur_cpus {
                self.write_set(&dir, "cpuset.cpus", &want_cpus, log)?;
            }
            parent = dir;
        }
        Ok(())
    }

    fn ensure_v2(
        &self,
        target: &Path,
        cpus: &CpuSet,
        kind: CgroupKind,
        log: &mut Vec<CgroupWrite>,
    ) -> Result<(), CgroupError> {
        let chain = self.chain(target);
        let mut parent = self.host.mount.clone();
        for dir in chain {
            Self::mkdir(&dir)?;
            let is_target = dir == target;
            if is_target && kind == CgroupKind::Threaded {
                let type_file = dir.join("cgroup.type");
                let cur = Self::read(&type_file).unwrap_or_default();
                if cur.trim() != "threaded" {
                    Self::write(&type_file, "threaded", false, log)?;
                }
            }
            // The parent delegates cpuset to its children.
            let sc = parent.join("cgroup.subtree_control");
            // A missing file reads as "nothing enabled"; the write that
            // follows reports the real error on a real cgroupfs.
            let current = match Self::read(&sc) {
                Ok(text) => text,
                Err(CgroupError::Missing { .. }) => String::new(),
                Err(e) => return Err(e),
            };
            if !lists_cpuset(&current) {
                Self::write(&sc, "+cpuset", false, log)?;
            }
            if is_target {
                let cur = Self::read_set(&dir.join("cpuset.cpus")).unwrap_or_default();
                if &cur != cpus {
                    self.write_set(&dir, "cpuset.cpus", cpus, log)?;
                }
            }
            parent = dir;
        }
        Ok(())
    }

    /// Changes `cpuset.cpus` of an existing cgroup (no ancestors touched).
    pub fn set_cpus(&self, cgroup: &str, cpus: &CpuSet) -> Result<(), CgroupError> {
        let dir = self.dir_of(cgroup)?;
        self.write_set(&dir, "cpuset.cpus", cpus, &mut Vec::new())
    }

    /// Moves thread `tid` into `cgroup` (`tasks` in v1, `cgroup.threads` in v2).
    pub fn move_thread(&self, cgroup: &str, tid: u32) -> Result<(), CgroupError> {
        let file = self.dir_of(cgroup)?.join(self.threads_file());
        Self::write(&file, &tid.to_string(), true, &mut Vec::new())
    }

    /// Moves every thread of process `pid` into `cgroup` (v1: `cgroup.procs`
    /// moves the whole thread group too).
    pub fn move_process(&self, cgroup: &str, pid: u32) -> Result<(), CgroupError> {
        let file = self.dir_of(cgroup)?.join("cgroup.procs");
        Self::write(&file, &pid.to_string(), true, &mut Vec::new())
    }

    /// Creates `cgroup` with `cpus` and moves `tid` into it: the whole pin of
    /// one thread. In v2 the cgroup is `threaded` and the thread's process
    /// must already be in the threaded subtree's domain (see
    /// [`Self::pin_vm_agent_layout`]).
    pub fn pin_thread(
        &self,
        cgroup: &str,
        tid: u32,
        cpus: &CpuSet,
        mems: Option<&CpuSet>,
    ) -> Result<Vec<CgroupWrite>, CgroupError> {
        let mut log = self.ensure_cpuset(cgroup, cpus, mems, CgroupKind::Threaded)?;
        self.move_thread(cgroup, tid)?;
        log.push(CgroupWrite {
            file: self.dir_of(cgroup)?.join(self.threads_file()),
            value: tid.to_string(),
        });
        Ok(log)
    }

    /// Pins a VM in the agent-owned layout: `sevplace/vm-<id>` holds the
    /// process (and its emulator threads, with `emulator_cpus`), and each
    /// `(index, tid, cpus)` vCPU goes to `sevplace/vm-<id>/vcpuN`.
    ///
    /// v1: every cgroup is created with its set, then each thread is moved
    /// (v1 moves single threads anywhere). v2: the VM cgroup is a domain;
    /// the process is moved into it, the `vcpuN` children are made
    /// `threaded` (the VM cgroup becomes "domain threaded", which may hold
    /// processes while delegating threaded controllers), then vCPU threads
    /// are moved through `cgroup.threads`.
    pub fn pin_vm_agent_layout(
        &self,
        vm: &VmId,
        pid: u32,
        emulator_cpus: &CpuSet,
        vcpus: &[(u32, u32, CpuSet)],
    ) -> Result<Vec<CgroupWrite>, CgroupError> {
        let vm_cg = self.agent_vm_cgroup(vm);
        let all: CpuSet = vcpus
            .iter()
            .fold(emulator_cpus.clone(), |acc, (_, _, c)| acc.union(c));
        let mut log = Vec::new();
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => {
                log.extend(self.ensure_cpuset(&vm_cg, &all, None, CgroupKind::Domain)?);
                let emu = self.agent_emulator_cgroup(vm);
                log.extend(self.ensure_cpuset(&emu, emulator_cpus, None, CgroupKind::Domain)?);
                for (index, _, cpus) in vcpus {
                    let cg = self.agent_vcpu_cgroup(vm, *index);
                    log.extend(self.ensure_cpuset(&cg, cpus, None, CgroupKind::Threaded)?);
                }
                // All threads to the emulator group, then vCPUs to their own.
                self.move_process(&emu, pid)?;
                for (index, tid, _) in vcpus {
                    self.move_thread(&self.agent_vcpu_cgroup(vm, *index), *tid)?;
                }
            }
            Hierarchy::Unified => {
                log.extend(self.ensure_cpuset(&vm_cg, &all, None, CgroupKind::Domain)?);
                self.move_process(&vm_cg, pid)?;
                for (index, _, cpus) in vcpus {
                    let cg = self.agent_vcpu_cgroup(vm, *index);
                    log.extend(self.ensure_cpuset(&cg, cpus, None, CgroupKind::Threaded)?);
                }
                for (index, tid, _) in vcpus {
                    self.move_thread(&self.agent_vcpu_cgroup(vm, *index), *tid)?;
                }
            }
        }
        Ok(log)
    }

    /// Removes `cgroup` and its child cgroups, children first. A cgroup that
    /// still holds tasks fails with `Busy`. A missing cgroup is not an error.
    pub fn remove(&self, cgroup: &str) -> Result<(), CgroupError> {
        let dir = self.dir_of(cgroup)?;
        if dir == self.host.mount {
            return Err(CgroupError::BadPath {
                path: cgroup.to_string(),
            });
        }
        Self::remove_dir_tree(&dir)
    }

    fn remove_dir_tree(dir: &Path) -> Result<(), CgroupError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CgroupError::from_io(dir, "", false, e)),
        };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                Self::remove_dir_tree(&entry.path())?;
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CgroupError::from_io(dir, "", false, e)),
        }
    }
}

/// Pins thread `tid` to `cpus` with `sched_setaffinity(2)`.
pub fn set_thread_affinity(tid: u32, cpus: &CpuSet) -> Result<(), CgroupError> {
    let target = format!("sched_setaffinity({tid})");
    let einval = |reason: String| CgroupError::InvalidSet {
        target: target.clone(),
        value: cpus.to_string(),
        reason,
    };
    if cpus.is_empty() {
        return Err(einval("empty CPU set".into()));
    }
    let mut set = nix::sched::CpuSet::new();
    for cpu in cpus.iter() {
        set.set(cpu as usize)
            .map_err(|_| einval(format!("CPU {cpu} above the affinity mask size")))?;
    }
    let pid = i32::try_from(tid).map_err(|_| CgroupError::VmGone {
        target: target.clone(),
    })?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set).map_err(|errno| {
        CgroupError::from_io_named(
            target.clone(),
            &cpus.to_string(),
            true,
            std::io::Error::from_raw_os_error(errno as i32),
        )
    })
}

/// Reads thread `tid`'s affinity with `sched_getaffinity(2)`.
pub fn get_thread_affinity(tid: u32) -> Result<CpuSet, CgroupError> {
    let target = format!("sched_getaffinity({tid})");
    let pid = i32::try_from(tid).map_err(|_| CgroupError::VmGone {
        target: target.clone(),
    })?;
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(pid)).map_err(|errno| {
        CgroupError::from_io_named(
            target.clone(),
            "",
            true,
            std::io::Error::from_raw_os_error(errno as i32),
        )
    })?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .filter_map(|c| u32::try_from(c).ok())
        .collect())
}

fn proc_err(e: ProcReadError) -> CgroupError {
    match e {
        ProcReadError::Gone { path } => CgroupError::VmGone {
            target: path.display().to_string(),
        },
        ProcReadError::Permission { path } => CgroupError::Permission {
            target: path.display().to_string(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32),
        },
        ProcReadError::Malformed { path, what } => CgroupError::Malformed {
            target: path.display().to_string(),
            what,
        },
        ProcReadError::Io { path, source } => CgroupError::Io {
            target: path.display().to_string(),
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
) -> Result<CpuSet, CgroupError> {
    procfs::read_cpus_allowed(proc_root, pid, tid).map_err(proc_err)
}

/// Reads the CPU thread `tid` last ran on (stat field 39).
pub fn read_thread_last_cpu(
    proc_root: &Path,
    pid: u32,
    tid: u32,
) -> Result<Option<u32>, CgroupError> {
    procfs::read_last_cpu(proc_root, pid, tid).map_err(proc_err)
}

#[cfg(test)]
mod tests;
