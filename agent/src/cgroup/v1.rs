//! cgroup v1 cpuset: file names and the write order the kernel requires.
//!
//! A new v1 cgroup has empty `cpuset.cpus` and `cpuset.mems`, and attaching
//! a task to it fails with `ENOSPC`; a child's set must be a subset of its
//! parent's (the kernel answers `EACCES`, not `EINVAL`). So every missing
//! ancestor is created and given its parent's CPUs and memory nodes, an
//! ancestor that lacks a requested CPU is widened, top-down, and only then
//! the target's `cpuset.mems` and `cpuset.cpus` are written. Threads move
//! by writing their tids to `tasks`.

use std::path::{Path, PathBuf};

use super::{fs, CgroupError, CgroupWrite, CPUSET_CPUS};
use crate::CpuSet;

/// `cpuset.mems`: the memory nodes of a cgroup.
pub(crate) const CPUSET_MEMS: &str = "cpuset.mems";
/// `cpuset.effective_cpus`: the CPUs in effect (v1 spelling).
pub(crate) const CPUSET_EFFECTIVE_CPUS: &str = "cpuset.effective_cpus";
/// `tasks`: thread ids of a cgroup; writing a tid moves that thread.
pub(crate) const TASKS: &str = "tasks";

/// Writes a cpulist to `dir/file` (`cpuset.cpus` or `cpuset.mems`). v1
/// answers EACCES when the set is not a subset of the parent's; that case
/// is reported as `InvalidSet` naming the parent's set.
pub(crate) fn write_set(
    mount: &Path,
    dir: &Path,
    file: &str,
    set: &CpuSet,
    log: &mut Vec<CgroupWrite>,
) -> Result<(), CgroupError> {
    let path = dir.join(file);
    match fs::write(&path, &set.to_string(), false, log) {
        Err(CgroupError::Permission {
            target,
            value,
            source,
        }) if dir != mount => {
            let parent_set = dir.parent().and_then(|p| fs::read_set(&p.join(file)).ok());
            match parent_set {
                Some(p) if !set.is_subset(&p) => Err(CgroupError::InvalidSet {
                    target,
                    value,
                    reason: format!("not a subset of the parent's {file} {p:?}"),
                }),
                _ => Err(CgroupError::Permission {
                    target,
                    value,
                    source,
                }),
            }
        }
        other => other,
    }
}

/// Creates every cgroup of `chain` (the directories from the mount's child
/// down to the target) and gives the target `cpus` and `mems` (`None`: its
/// parent's nodes), ancestors first (module docs).
pub(crate) fn ensure(
    mount: &Path,
    chain: &[PathBuf],
    cpus: &CpuSet,
    mems: Option<&CpuSet>,
    log: &mut Vec<CgroupWrite>,
) -> Result<(), CgroupError> {
    let Some(target) = chain.last() else {
        return Err(CgroupError::BadPath {
            path: mount.display().to_string(),
        });
    };
    let mut parent = mount.to_path_buf();
    for dir in chain {
        fs::mkdir(dir)?;
        let parent_cpus = fs::read_set(&parent.join(CPUSET_CPUS))?;
        let parent_mems = fs::read_set(&parent.join(CPUSET_MEMS))?;
        let is_target = dir == target;
        // Memory nodes first: a cgroup with CPUs but no nodes still
        // refuses tasks, and mems never constrain the CPU write.
        let cur_mems = fs::read_set(&dir.join(CPUSET_MEMS))?;
        let want_mems = match (is_target, mems) {
            (true, Some(m)) => m.clone(),
            _ if cur_mems.is_empty() => parent_mems.clone(),
            _ => cur_mems.clone(),
        };
        if want_mems != cur_mems {
            write_set(mount, dir, CPUSET_MEMS, &want_mems, log)?;
        }
        let cur_cpus = fs::read_set(&dir.join(CPUSET_CPUS))?;
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
            write_set(mount, dir, CPUSET_CPUS, &want_cpus, log)?;
        }
        parent = dir.clone();
    }
    Ok(())
}
