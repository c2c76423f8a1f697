//! `sched_setaffinity(2)` and `sched_getaffinity(2)`, behind the
//! [`ThreadAffinity`] trait so that tests against a fake procfs (whose tids
//! are not real threads) replace the system call.

use super::{CgroupError, Target};
use crate::CpuSet;

/// Sets a thread's CPU affinity: [`SchedAffinity`] on a host, a fake in
/// tests that run against a fake procfs.
pub trait ThreadAffinity: Send + Sync {
    /// Restricts thread `tid` to `cpus`.
    fn set(&self, tid: u32, cpus: &CpuSet) -> Result<(), CgroupError>;
}

/// The real `sched_setaffinity(2)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedAffinity;

impl ThreadAffinity for SchedAffinity {
    fn set(&self, tid: u32, cpus: &CpuSet) -> Result<(), CgroupError> {
        set_thread_affinity(tid, cpus)
    }
}

fn errno_err(target: Target, value: &str, errno: nix::errno::Errno) -> CgroupError {
    CgroupError::from_io(
        target,
        value,
        true,
        std::io::Error::from_raw_os_error(errno as i32),
    )
}

/// Pins thread `tid` to `cpus` with `sched_setaffinity(2)`.
pub fn set_thread_affinity(tid: u32, cpus: &CpuSet) -> Result<(), CgroupError> {
    let target = Target::Syscall {
        call: "sched_setaffinity",
        tid,
    };
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
        let index = usize::try_from(cpu)
            .map_err(|_| einval(format!("CPU {cpu} above the affinity mask size")))?;
        set.set(index)
            .map_err(|_| einval(format!("CPU {cpu} above the affinity mask size")))?;
    }
    let pid = i32::try_from(tid).map_err(|_| CgroupError::VmGone {
        target: target.clone(),
    })?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set)
        .map_err(|errno| errno_err(target.clone(), &cpus.to_string(), errno))
}

/// Reads thread `tid`'s affinity with `sched_getaffinity(2)`.
pub fn get_thread_affinity(tid: u32) -> Result<CpuSet, CgroupError> {
    let target = Target::Syscall {
        call: "sched_getaffinity",
        tid,
    };
    let pid = i32::try_from(tid).map_err(|_| CgroupError::VmGone {
        target: target.clone(),
    })?;
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(pid))
        .map_err(|errno| errno_err(target.clone(), "", errno))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .filter_map(|c| u32::try_from(c).ok())
        .collect())
}
