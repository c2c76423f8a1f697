//! cgroup v2 cpuset: file names and the write order the kernel requires.
//!
//! `+cpuset` is enabled in `cgroup.subtree_control` of every ancestor,
//! top-down; a thread-level child gets `cgroup.type` = `threaded` before its
//! parent enables `+cpuset` for it; then `cpuset.cpus` is written. Threads
//! move through `cgroup.threads`, processes through `cgroup.procs`.

#[cfg(any(test, feature = "testing"))]
use std::path::{Path, PathBuf};

#[cfg(any(test, feature = "testing"))]
use super::{fs, lists_cpuset, CgroupError, CgroupKind, CgroupWrite, CPUSET_CPUS};
#[cfg(any(test, feature = "testing"))]
use crate::CpuSet;

/// `cgroup.controllers`: the controllers available in a cgroup; its
/// presence at the root marks a unified mount.
pub(crate) const CGROUP_CONTROLLERS: &str = "cgroup.controllers";
/// `cgroup.subtree_control`: the controllers a cgroup delegates.
#[cfg(any(test, feature = "testing"))]
pub(crate) const CGROUP_SUBTREE_CONTROL: &str = "cgroup.subtree_control";
/// `cgroup.type`: `domain`, `domain threaded` or `threaded`.
#[cfg(any(test, feature = "testing"))]
pub(crate) const CGROUP_TYPE: &str = "cgroup.type";
/// `cgroup.threads`: thread ids of a cgroup; writing a tid moves it.
pub(crate) const CGROUP_THREADS: &str = "cgroup.threads";
/// `cpuset.cpus.effective`: the CPUs in effect (v2 spelling).
pub(crate) const CPUSET_CPUS_EFFECTIVE: &str = "cpuset.cpus.effective";

/// Creates every cgroup of `chain` (the directories from the mount's child
/// down to the target), delegates cpuset down to the target and gives it
/// `cpus` (module docs). A `Threaded` target is made `threaded` first.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn ensure(
    mount: &Path,
    chain: &[PathBuf],
    cpus: &CpuSet,
    kind: CgroupKind,
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
        let is_target = dir == target;
        if is_target && kind == CgroupKind::Threaded {
            let type_file = dir.join(CGROUP_TYPE);
            let cur = fs::read(&type_file).unwrap_or_default();
            if cur.trim() != "threaded" {
                fs::write(&type_file, "threaded", false, log)?;
            }
        }
        // The parent delegates cpuset to its children.
        let sc = parent.join(CGROUP_SUBTREE_CONTROL);
        // A missing file reads as "nothing enabled"; the write that
        // follows reports the real error on a real cgroupfs.
        let current = match fs::read(&sc) {
            Ok(text) => text,
            Err(CgroupError::Missing { .. }) => String::new(),
            Err(e) => return Err(e),
        };
        if !lists_cpuset(&current) {
            fs::write(&sc, "+cpuset", false, log)?;
        }
        if is_target {
            let cur = fs::read_set(&dir.join(CPUSET_CPUS)).unwrap_or_default();
            if &cur != cpus {
                fs::write(&dir.join(CPUSET_CPUS), &cpus.to_string(), false, log)?;
            }
        }
        parent = dir.clone();
    }
    Ok(())
}
