//! cpuset cgroups (v1 and v2 behind one interface) and thread affinity.
//!
//! The cgroupfs root is a parameter (default `/sys/fs/cgroup`).
//! [`CgroupHost::detect`] finds the cpuset controller:
//! - cgroup v2 when `<root>/cgroup.controllers` exists (a pure unified
//!   mount), or when `<root>/unified/cgroup.controllers` lists `cpuset`
//!   (a hybrid host that gave cpuset to v2);
//! - cgroup v1 when `<root>/cpuset/cpuset.cpus` exists.
//!
//! [`CpusetWriter`] is the one interface; each hierarchy's write order and
//! file names live in its own file: [`v1`] (memory nodes and CPUs of every
//! missing or narrower ancestor first, `tasks`) and [`v2`] (`+cpuset` in
//! every ancestor's `cgroup.subtree_control`, `threaded` children,
//! `cgroup.threads`). [`fs`] holds the single-write and read helpers both
//! use. `sched_setaffinity` is in [`affinity`], behind the
//! [`ThreadAffinity`] trait. This module sits below `discovery`: the
//! procfs readback of what the kernel enforces is
//! `discovery::read_thread_cpus_allowed`.

pub(crate) mod affinity;
pub(crate) mod fs;
pub(crate) mod v1;
pub(crate) mod v2;

use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::CpuSet;

pub use affinity::{get_thread_affinity, set_thread_affinity};
pub use affinity::{SchedAffinity, ThreadAffinity};

/// `cpuset.cpus`: the configured CPUs of a cgroup (same name in v1 and v2).
pub(crate) const CPUSET_CPUS: &str = "cpuset.cpus";
/// `cgroup.procs`: whole processes of a cgroup (same name in v1 and v2).
#[cfg(any(test, feature = "testing"))]
pub(crate) const CGROUP_PROCS: &str = "cgroup.procs";

/// Which cgroup hierarchy holds the cpuset controller, or which one a path
/// belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hierarchy {
    /// The cgroup v1 hierarchy with the `cpuset` controller.
    V1Cpuset,
    /// The cgroup v2 unified hierarchy.
    Unified,
}

/// What an operation acted on: a cgroupfs or procfs file, or a system call
/// on a thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A file (or directory) under cgroupfs or procfs.
    File(PathBuf),
    /// A system call such as `sched_setaffinity` on thread `tid`.
    Syscall {
        /// The system call's name.
        call: &'static str,
        /// The thread it named.
        tid: u32,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Syscall { call, tid } => write!(f, "{call}({tid})"),
        }
    }
}

/// `" writing \"V\""` for a write of `V`, nothing for a read.
fn written(value: &str) -> String {
    if value.is_empty() {
        String::new()
    } else {
        format!(" writing {value:?}")
    }
}

/// Errors from cpuset and affinity operations. Each names its [`Target`]
/// and, for a write, the value written.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The thread or process exited (ESRCH, or ENOENT on a thread).
    #[error("{target}: thread or process is gone")]
    VmGone {
        /// What was acted on.
        target: Target,
    },
    /// EACCES or EPERM (delegation, containers, not root).
    #[error("{target}: permission denied{}: {source}", written(.value))]
    Permission {
        /// What was acted on.
        target: Target,
        /// The value written (empty for a read).
        value: String,
        /// What the kernel returned.
        source: std::io::Error,
    },
    /// The set is not allowed here: EINVAL (no online CPU, not a cpulist,
    /// outside the cpuset for `sched_setaffinity`), or a v1 set that is not
    /// a subset of the parent's (the kernel returns EACCES for that;
    /// [`v1`] tells it apart from a permission error).
    #[error("{target}: invalid CPU set {value:?}: {reason}")]
    InvalidSet {
        /// What was acted on.
        target: Target,
        /// The value written.
        value: String,
        /// Why the kernel or the v1 rule refused it.
        reason: String,
    },
    /// EBUSY: a child still uses CPUs being removed, or a v2 cgroup with
    /// processes cannot enable controllers ("no internal processes").
    #[error("{target}: busy{}: {source}", written(.value))]
    Busy {
        /// What was acted on.
        target: Target,
        /// The value written (empty for a read).
        value: String,
        /// What the kernel returned.
        source: std::io::Error,
    },
    /// ENOSPC: v1 attach to a cgroup whose `cpuset.cpus` or `cpuset.mems`
    /// is empty.
    #[error("{target}: cpuset.cpus or cpuset.mems is empty{}: {source}", written(.value))]
    NoSpace {
        /// What was acted on.
        target: Target,
        /// The value written (empty for a read).
        value: String,
        /// What the kernel returned.
        source: std::io::Error,
    },
    /// The cgroup directory or file does not exist (ENOENT, not on a thread).
    #[error("{target}: no such cgroup or file")]
    Missing {
        /// What was acted on.
        target: Target,
    },
    /// No cpuset controller under the root.
    #[error("no cpuset controller under {root}: neither {root}/cgroup.controllers (v2) nor {root}/cpuset/cpuset.cpus (v1) is usable")]
    NoCpuset {
        /// The cgroupfs root searched.
        root: PathBuf,
    },
    /// A cgroup path with `..` or other non-normal components.
    #[error("cgroup path {path:?} must be absolute within the hierarchy, without '..'")]
    BadPath {
        /// The path given.
        path: String,
    },
    /// A file with unexpected content.
    #[error("{target}: {what}")]
    Malformed {
        /// What was read.
        target: Target,
        /// What is wrong with the content.
        what: String,
    },
    /// Any other I/O error.
    #[error("{target}{}: {source}", written(.value))]
    Io {
        /// What was acted on.
        target: Target,
        /// The value written (empty for a read).
        value: String,
        /// What the kernel returned.
        source: std::io::Error,
    },
}

impl CgroupError {
    /// Maps an errno from a write of `value` (empty for a read) to `target`.
    /// `on_thread`: the operation names a thread, so ENOENT means the thread
    /// is gone.
    pub(crate) fn from_io(target: Target, value: &str, on_thread: bool, e: std::io::Error) -> Self {
        use nix::errno::Errno;
        let errno = e.raw_os_error().map(Errno::from_raw);
        let value = value.to_string();
        match errno {
            Some(Errno::ESRCH) => Self::VmGone { target },
            Some(Errno::ENOENT) if on_thread => Self::VmGone { target },
            Some(Errno::ENOENT) => Self::Missing { target },
            Some(Errno::EACCES) | Some(Errno::EPERM) => Self::Permission {
                target,
                value,
                source: e,
            },
            Some(Errno::EINVAL) => Self::InvalidSet {
                target,
                value,
                reason: e.to_string(),
            },
            Some(Errno::EBUSY) => Self::Busy {
                target,
                value,
                source: e,
            },
            Some(Errno::ENOSPC) => Self::NoSpace {
                target,
                value,
                source: e,
            },
            _ => Self::Io {
                target,
                value,
                source: e,
            },
        }
    }

    /// A short stable name of the error kind, for metrics labels.
    pub(crate) fn kind(&self) -> &'static str {
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
pub(crate) fn lists_cpuset(text: &str) -> bool {
    text.split_whitespace()
        .any(|w| w.trim_start_matches('+') == "cpuset")
}

/// Parses a thread or process id list (`tasks`, `cgroup.threads`,
/// `cgroup.procs`): one id per line, blank lines skipped; the error names
/// the first line that is not an id.
pub(crate) fn parse_thread_ids(text: &str) -> Result<Vec<u32>, String> {
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
    /// The hierarchy that holds the cpuset controller.
    pub(crate) hierarchy: Hierarchy,
    /// The directory of the hierarchy's root cgroup.
    pub mount: PathBuf,
}

impl CgroupHost {
    /// Detects the cpuset hierarchy under `root` (see the module docs).
    pub(crate) fn detect(root: impl AsRef<Path>) -> Result<Self, CgroupError> {
        let root = root.as_ref();
        if root.join(v2::CGROUP_CONTROLLERS).is_file() {
            return Ok(Self {
                hierarchy: Hierarchy::Unified,
                mount: root.to_path_buf(),
            });
        }
        let unified = root.join("unified");
        if let Ok(c) = std::fs::read_to_string(unified.join(v2::CGROUP_CONTROLLERS)) {
            if c.split_whitespace().any(|w| w == "cpuset") {
                return Ok(Self {
                    hierarchy: Hierarchy::Unified,
                    mount: unified,
                });
            }
        }
        let v1 = root.join("cpuset");
        if v1.join(CPUSET_CPUS).is_file() {
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
    /// The file written.
    pub(crate) file: PathBuf,
    /// The value written.
    pub(crate) value: String,
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

/// Writes and reads cpusets in the host's cpuset hierarchy, dispatching to
/// [`v1`] or [`v2`].
#[derive(Debug, Clone)]
pub struct CpusetWriter {
    host: CgroupHost,
}

impl CpusetWriter {
    /// A writer for the hierarchy `host` describes.
    pub(crate) fn new(host: CgroupHost) -> Self {
        Self { host }
    }

    /// Detects the hierarchy under `root` and returns a writer for it.
    pub fn detect(root: impl AsRef<Path>) -> Result<Self, CgroupError> {
        CgroupHost::detect(root).map(Self::new)
    }

    /// Where the hierarchy is.
    pub fn host(&self) -> &CgroupHost {
        &self.host
    }

    /// Which hierarchy this writer writes.
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

    fn effective_cpus_file(&self) -> &'static str {
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => v1::CPUSET_EFFECTIVE_CPUS,
            Hierarchy::Unified => v2::CPUSET_CPUS_EFFECTIVE,
        }
    }

    fn threads_file(&self) -> &'static str {
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => v1::TASKS,
            Hierarchy::Unified => v2::CGROUP_THREADS,
        }
    }

    /// `cpuset.cpus` of `cgroup` (what was configured).
    pub fn read_cpus(&self, cgroup: &str) -> Result<CpuSet, CgroupError> {
        fs::read_set(&self.dir_of(cgroup)?.join(CPUSET_CPUS))
    }

    /// The effective CPUs of `cgroup` (configured set within its parents').
    pub fn read_effective_cpus(&self, cgroup: &str) -> Result<CpuSet, CgroupError> {
        fs::read_set(&self.dir_of(cgroup)?.join(self.effective_cpus_file()))
    }

    /// Thread ids in `cgroup` (`tasks` in v1, `cgroup.threads` in v2).
    pub fn read_threads(&self, cgroup: &str) -> Result<Vec<u32>, CgroupError> {
        let file = self.dir_of(cgroup)?.join(self.threads_file());
        let text = fs::read(&file)?;
        parse_thread_ids(&text).map_err(|what| CgroupError::Malformed {
            target: Target::File(file),
            what,
        })
    }

    /// Creates `cgroup` (and its ancestors) and sets its CPUs, in the order
    /// the kernel requires ([`v1::ensure`], [`v2::ensure`]). `mems` applies
    /// to v1 (`None`: the parent's nodes); v2 leaves `cpuset.mems` empty,
    /// which means all nodes of the parent. Returns the writes made. The
    /// daemon never creates cgroups; tests arrange libvirt's layouts with it.
    #[cfg(any(test, feature = "testing"))]
    pub fn ensure_cpuset(
        &self,
        cgroup: &str,
        cpus: &CpuSet,
        mems: Option<&CpuSet>,
        kind: CgroupKind,
    ) -> Result<Vec<CgroupWrite>, CgroupError> {
        if cpus.is_empty() {
            return Err(CgroupError::InvalidSet {
                target: Target::File(PathBuf::from(cgroup)),
                value: String::new(),
                reason: "empty CPU set".to_string(),
            });
        }
        let target = self.dir_of(cgroup)?;
        let chain = self.chain(&target);
        let mut log = Vec::new();
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => v1::ensure(&self.host.mount, &chain, cpus, mems, &mut log)?,
            Hierarchy::Unified => v2::ensure(&self.host.mount, &chain, cpus, kind, &mut log)?,
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

    /// Changes `cpuset.cpus` of an existing cgroup (no ancestors touched),
    /// as libvirt or an operator does: tests make drift with it.
    #[cfg(any(test, feature = "testing"))]
    pub fn set_cpus(&self, cgroup: &str, cpus: &CpuSet) -> Result<(), CgroupError> {
        let dir = self.dir_of(cgroup)?;
        let mut log = Vec::new();
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => {
                v1::write_set(&self.host.mount, &dir, CPUSET_CPUS, cpus, &mut log)
            }
            Hierarchy::Unified => {
                fs::write(&dir.join(CPUSET_CPUS), &cpus.to_string(), false, &mut log)
            }
        }
    }

    /// Sets `cpuset.cpus` of the existing `cgroup` to `cpus`. v1 requires a
    /// child's set within its parent's, so each ancestor that lacks a
    /// requested CPU is widened first, top-down ([`v1::ensure`]); v2 takes
    /// any set (the effective set is the intersection with the parent's).
    /// A missing cgroup is `Missing`, never created.
    pub(crate) fn set_cpus_within_parents(
        &self,
        cgroup: &str,
        cpus: &CpuSet,
    ) -> Result<Vec<CgroupWrite>, CgroupError> {
        let dir = self.dir_of(cgroup)?;
        if !dir.is_dir() {
            return Err(CgroupError::Missing {
                target: Target::File(dir),
            });
        }
        let mut log = Vec::new();
        match self.host.hierarchy {
            Hierarchy::V1Cpuset => {
                v1::ensure(&self.host.mount, &self.chain(&dir), cpus, None, &mut log)?
            }
            Hierarchy::Unified => {
                fs::write(&dir.join(CPUSET_CPUS), &cpus.to_string(), false, &mut log)?
            }
        }
        Ok(log)
    }

    /// Moves thread `tid` into `cgroup` (`tasks` in v1, `cgroup.threads` in
    /// v2). The daemon never moves threads (it pins VMs in the cgroups they
    /// are in); tests use this to arrange libvirt's layouts.
    #[cfg(any(test, feature = "testing"))]
    pub fn move_thread(&self, cgroup: &str, tid: u32) -> Result<(), CgroupError> {
        let file = self.dir_of(cgroup)?.join(self.threads_file());
        fs::write(&file, &tid.to_string(), true, &mut Vec::new())
    }

    /// Moves every thread of process `pid` into `cgroup` (`cgroup.procs`);
    /// like [`Self::move_thread`], for tests that arrange layouts.
    #[cfg(any(test, feature = "testing"))]
    pub fn move_process(&self, cgroup: &str, pid: u32) -> Result<(), CgroupError> {
        let file = self.dir_of(cgroup)?.join(CGROUP_PROCS);
        fs::write(&file, &pid.to_string(), true, &mut Vec::new())
    }

    /// Removes `cgroup` and its child cgroups, children first. A cgroup that
    /// still holds tasks fails with `Busy`. A missing cgroup is not an error.
    #[cfg(any(test, feature = "testing"))]
    pub fn remove(&self, cgroup: &str) -> Result<(), CgroupError> {
        let dir = self.dir_of(cgroup)?;
        if dir == self.host.mount {
            return Err(CgroupError::BadPath {
                path: cgroup.to_string(),
            });
        }
        fs::remove_dir_tree(&dir)
    }
}

#[cfg(test)]
mod tests;
