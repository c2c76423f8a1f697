//! Reading a thread's CPU affinity during a scan.
//!
//! On a real host the affinity comes from `sched_getaffinity(2)`: one system
//! call, no file to open, read or parse. A fixture tree (the fake procfs of
//! the tests and benchmarks) has no thread behind its tids, so there the
//! affinity is parsed from `task/<tid>/status` (`Cpus_allowed_list`). Which
//! one applies is decided by the file system of the procfs root
//! ([`AffinitySource::for_root`]): a mounted procfs names this host's threads,
//! anything else is a fixture.

use std::path::Path;

use super::procfs::{self as procfile, ProcReadError};
use crate::CpuSet;

/// CPUs `sched_getaffinity` can report: 8192, far above any x86 host
/// (the kernel's `NR_CPUS` maximum is 8192).
const AFFINITY_MASK_WORDS: usize = 8192 / 64;

/// Reads the affinity mask of one thread.
pub(crate) trait AffinityReader: std::fmt::Debug + Send + Sync {
    /// The CPUs thread `tid` of process `pid` may run on. `Gone` when the
    /// thread exited.
    fn cpus_allowed(&self, proc_root: &Path, pid: u32, tid: u32) -> Result<CpuSet, ProcReadError>;
}

/// `sched_getaffinity(2)` on the thread id: for a procfs root that is this
/// host's `/proc`. Returns the task's `cpus_mask`, which is what
/// `Cpus_allowed_list` in `status` shows.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SchedGetaffinity;

/// `Cpus_allowed_list` from `task/<tid>/status`: for fixture trees, whose
/// tids are not threads of this host.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StatusFile;

impl AffinityReader for SchedGetaffinity {
    fn cpus_allowed(&self, proc_root: &Path, pid: u32, tid: u32) -> Result<CpuSet, ProcReadError> {
        sched_getaffinity(tid).map_err(|e| {
            // The path names the thread in errors as a status read would.
            ProcReadError::from_io(
                &procfile::task_file(proc_root, pid, tid, "(sched_getaffinity)"),
                e,
            )
        })
    }
}

impl AffinityReader for StatusFile {
    fn cpus_allowed(&self, proc_root: &Path, pid: u32, tid: u32) -> Result<CpuSet, ProcReadError> {
        procfile::read_cpus_allowed(proc_root, pid, tid)
    }
}

/// Which reader a procfs root calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AffinitySource {
    /// The root is a procfs mount: `sched_getaffinity`.
    Syscall,
    /// The root is a fixture directory: `status` files.
    StatusFile,
}

impl AffinitySource {
    /// [`Self::Syscall`] when `proc_root` is a mounted procfs, else
    /// [`Self::StatusFile`] (also when the root cannot be examined: the
    /// status files then report the error per thread).
    pub(crate) fn for_root(proc_root: &Path) -> Self {
        match nix::sys::statfs::statfs(proc_root) {
            Ok(fs) if fs.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC => Self::Syscall,
            _ => Self::StatusFile,
        }
    }

    /// The reader for this source.
    pub(crate) fn reader(self) -> std::sync::Arc<dyn AffinityReader> {
        match self {
            Self::Syscall => std::sync::Arc::new(SchedGetaffinity),
            Self::StatusFile => std::sync::Arc::new(StatusFile),
        }
    }
}

/// `sched_getaffinity(tid)` as a CPU set.
fn sched_getaffinity(tid: u32) -> std::io::Result<CpuSet> {
    let tid =
        libc::pid_t::try_from(tid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    let mut mask = [0u64; AFFINITY_MASK_WORDS];
    // SAFETY: the kernel writes at most `size_of_val(&mask)` bytes into
    // `mask`, which lives for the whole call; the raw syscall (not the libc
    // wrapper) is used so a mask larger than `cpu_set_t` is accepted.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            tid,
            std::mem::size_of_val(&mask),
            mask.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The kernel returns the bytes it wrote (a multiple of 8 on x86-64).
    let written = usize::try_from(ret)
        .unwrap_or(0)
        .min(std::mem::size_of_val(&mask));
    let mut set = CpuSet::new();
    for (w, word) in mask.iter().take(written.div_ceil(8)).enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let bit = bits.trailing_zeros();
            bits &= bits - 1;
            if let Ok(cpu) = u32::try_from(w * 64 + bit as usize) {
                set.insert(cpu);
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_matches_the_status_file_of_this_thread() {
        let proc_root = Path::new(crate::discovery::DEFAULT_PROC_ROOT);
        assert_eq!(AffinitySource::for_root(proc_root), AffinitySource::Syscall);
        let pid = std::process::id();
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = u32::try_from(unsafe { libc::gettid() }).unwrap();
        let from_syscall = SchedGetaffinity.cpus_allowed(proc_root, pid, tid).unwrap();
        let from_status = StatusFile.cpus_allowed(proc_root, pid, tid).unwrap();
        assert_eq!(from_syscall, from_status);
        assert!(!from_syscall.is_empty());
    }

    #[test]
    fn fixture_roots_read_status_and_exited_threads_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            AffinitySource::for_root(dir.path()),
            AffinitySource::StatusFile
        );
        let mut vm = crate::discovery::fake_procfs::FakeProcess::qemu_vm(100, 1, &["qemu"]);
        vm.threads[2].cpus_allowed = "5,7".into();
        crate::discovery::fake_procfs::write_process(dir.path(), &vm).unwrap();
        let set = AffinitySource::StatusFile
            .reader()
            .cpus_allowed(dir.path(), 100, 102)
            .unwrap();
        assert_eq!(set, CpuSet::parse("5,7").unwrap());
        // A tid no thread has: ESRCH from the syscall, `Gone` to the scan.
        let err = SchedGetaffinity
            .cpus_allowed(Path::new("/proc"), 1, u32::MAX / 2)
            .unwrap_err();
        assert!(matches!(err, ProcReadError::Gone { .. }), "{err}");
    }
}
