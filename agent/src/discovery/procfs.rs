//! Parsers for the procfs files discovery reads, and readers that take the
//! procfs root as a parameter so tests point them at a fake tree.

use std::io;
use std::path::{Path, PathBuf};

use crate::CpuSet;

/// `PF_KTHREAD` in `/proc/<pid>/stat` field 9 (flags): a kernel thread.
pub(crate) const PF_KTHREAD: u64 = 0x0020_0000;
/// `PF_USER_WORKER`: a kernel worker attached to a user process (KVM's
/// `kvm-nx-lpage-re` recovery thread is one on kernels >= 6.13), listed in
/// `/proc/<pid>/task/` beside the process's own threads.
pub(crate) const PF_USER_WORKER: u64 = 0x0000_4000;

/// `PF_IO_WORKER`: an io_uring worker (`iou-wrk-*`) of a user process
/// (QEMU with `aio=io_uring`); listed among the process's threads.
pub(crate) const PF_IO_WORKER: u64 = 0x0000_0010;
/// `PF_NO_SETAFFINITY`: `sched_setaffinity` on this task fails with EINVAL.
pub(crate) const PF_NO_SETAFFINITY: u64 = 0x0400_0000;

/// Names of KVM's kernel worker threads that can appear among a VM
/// process's tasks; they are never vCPUs.
pub(crate) const KVM_WORKER_PREFIXES: [&str; 2] = ["kvm-nx-lpage-re", "kvm-pit"];

/// The fields of `/proc/<pid>/stat` (or `task/<tid>/stat`) that discovery
/// uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskStat {
    /// Field 2, between the first `(` and the last `)`.
    pub(crate) comm: String,
    /// Field 3.
    pub(crate) state: char,
    /// Field 9: `PF_*` flags.
    pub(crate) flags: u64,
    /// Field 22: start time in clock ticks after boot; with the pid it
    /// identifies a process across pid reuse.
    pub(crate) start_time: u64,
    /// Field 39: the CPU the task last ran on.
    pub(crate) last_cpu: Option<u32>,
}

impl TaskStat {
    /// Whether `sched_setaffinity` can change this task's CPUs (io_uring
    /// workers and some kernel workers refuse it).
    pub(crate) fn affinity_settable(&self) -> bool {
        self.flags & (PF_NO_SETAFFINITY | PF_IO_WORKER) == 0
    }

    /// A kernel thread, or a kernel worker attached to a user process.
    pub(crate) fn is_kernel_worker(&self) -> bool {
        self.flags & (PF_KTHREAD | PF_USER_WORKER) != 0
            || KVM_WORKER_PREFIXES.iter().any(|p| self.comm.starts_with(p))
    }
}

/// Parses a stat line with the `procfs` crate's parser.
///
/// That parser slices the line at the first `(` and the last `)` without
/// checking the indices (it panics on a line with no byte before the `(`,
/// or with no `' '` after the `)`), so the shape it relies on is checked
/// here first: the kernel always writes `PID (COMM) S ...`, so a line
/// without that shape is reported as malformed. The comm field may contain
/// spaces and parentheses (QEMU's `CPU 0/KVM`); fields are counted after
/// the last `)`.
pub(crate) fn parse_stat(text: &str) -> Result<TaskStat, String> {
    let line = text.trim();
    let bytes = line.as_bytes();
    let open = line.find('(').ok_or("no '(' before comm")?;
    let close = line.rfind(')').ok_or("no ')' after comm")?;
    if close < open {
        return Err("')' before '('".into());
    }
    if open == 0 || bytes[open - 1] != b' ' {
        return Err("no pid and space before '('".into());
    }
    if bytes.get(close + 1) != Some(&b' ') || bytes.len() < close + 3 {
        return Err("no fields after comm".into());
    }
    let stat = <::procfs::process::Stat as ::procfs::FromRead>::from_read(line.as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(TaskStat::from(stat))
}

impl From<::procfs::process::Stat> for TaskStat {
    fn from(st: ::procfs::process::Stat) -> Self {
        Self {
            comm: st.comm,
            state: st.state,
            flags: u64::from(st.flags),
            start_time: st.starttime,
            // A negative value means unknown.
            last_cpu: st.processor.and_then(|c| u32::try_from(c).ok()),
        }
    }
}

/// A whole procfs file as text, bytes that are not UTF-8 read as U+FFFD,
/// read through the `procfs` crate's directory handles
/// ([`::procfs::process::Process::read`]); the files discovery parses
/// itself (`cmdline`, `cgroup`, `syscall`, `stat`) are read this way.
#[derive(Debug, Clone)]
pub(crate) struct LossyText(pub String);

impl ::procfs::FromRead for LossyText {
    fn from_read<R: std::io::Read>(mut r: R) -> ::procfs::ProcResult<Self> {
        let mut bytes = Vec::with_capacity(512);
        r.read_to_end(&mut bytes)?;
        Ok(Self(String::from_utf8_lossy(&bytes).into_owned()))
    }
}

/// A `procfs` crate error for a read of `path`, classified.
pub(crate) fn from_procfs_error(path: &Path, e: ::procfs::ProcError) -> ProcReadError {
    let path = path.to_path_buf();
    match e {
        ::procfs::ProcError::NotFound(_) => ProcReadError::Gone { path },
        ::procfs::ProcError::PermissionDenied(_) => ProcReadError::Permission { path },
        ::procfs::ProcError::Io(source, _) => ProcReadError::from_io(&path, source),
        other => ProcReadError::Malformed {
            path,
            what: other.to_string(),
        },
    }
}

/// Extracts `Cpus_allowed_list` from the text of a status file.
pub(crate) fn parse_status_cpus_allowed(text: &str) -> Result<CpuSet, String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or("no Cpus_allowed_list line")?;
    CpuSet::parse(line.trim()).map_err(|e| format!("Cpus_allowed_list: {e}"))
}

/// The vCPU index of a `kvm-vcpu:N` fd link target, if it is one.
pub(crate) fn vcpu_fd_index(link_target: &str) -> Option<u32> {
    link_target
        .strip_prefix("anon_inode:kvm-vcpu:")?
        .parse()
        .ok()
}

/// Whether an fd link target is a KVM VM.
pub(crate) fn is_vm_fd(link_target: &str) -> bool {
    link_target == "anon_inode:kvm-vm"
}

/// `KVM_RUN` ioctl request number (`_IO(0xAE, 0x80)`).
pub(crate) const KVM_RUN: u64 = 0xAE80;
/// `ioctl` system call number on x86-64.
pub(crate) const SYS_IOCTL_X86_64: u64 = 16;

/// Parses `/proc/<pid>/task/<tid>/syscall`; returns the fd when the thread
/// is blocked in `ioctl(fd, KVM_RUN)`. A thread executing (in the guest or
/// in user space) reads `running` and gives `None`.
pub(crate) fn parse_syscall_kvm_run_fd(text: &str) -> Option<u32> {
    let mut f = text.split_whitespace();
    let nr: u64 = f.next()?.parse().ok()?;
    if nr != SYS_IOCTL_X86_64 {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let fd = hex(f.next()?)?;
    let req = hex(f.next()?)?;
    if req != KVM_RUN {
        return None;
    }
    u32::try_from(fd).ok()
}

/// Path of `/proc/<pid>/task/<tid>/<file>` under `proc_root`.
pub(crate) fn task_file(proc_root: &Path, pid: u32, tid: u32, file: &str) -> PathBuf {
    proc_root
        .join(pid.to_string())
        .join("task")
        .join(tid.to_string())
        .join(file)
}

/// Why a procfs read failed, classified for the caller.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcReadError {
    /// The task exited (ENOENT or ESRCH).
    #[error("{path}: task is gone")]
    Gone { path: PathBuf },
    /// EACCES or EPERM.
    #[error("{path}: permission denied")]
    Permission { path: PathBuf },
    /// The file does not have the expected format.
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    /// Any other I/O error.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl ProcReadError {
    pub(crate) fn from_io(path: &Path, e: io::Error) -> Self {
        let path = path.to_path_buf();
        match e.raw_os_error() {
            Some(libc_errno::ENOENT) | Some(libc_errno::ESRCH) => Self::Gone { path },
            Some(libc_errno::EACCES) | Some(libc_errno::EPERM) => Self::Permission { path },
            _ if e.kind() == io::ErrorKind::NotFound => Self::Gone { path },
            _ => Self::Io { path, source: e },
        }
    }
}

/// errno values used to classify I/O errors (Linux numbering, from nix).
pub(crate) mod libc_errno {
    use nix::errno::Errno;
    pub(crate) const ENOENT: i32 = Errno::ENOENT as i32;
    pub(crate) const ESRCH: i32 = Errno::ESRCH as i32;
    pub(crate) const EACCES: i32 = Errno::EACCES as i32;
    pub(crate) const EPERM: i32 = Errno::EPERM as i32;
}

/// Reads a procfs file to a string.
pub(crate) fn read_text(path: &Path) -> Result<String, ProcReadError> {
    std::fs::read_to_string(path).map_err(|e| ProcReadError::from_io(path, e))
}

/// Reads a procfs file whose content the process sets (its command line,
/// a thread's name in `stat`) and need not be UTF-8; bytes that are not
/// UTF-8 become U+FFFD.
pub(crate) fn read_text_lossy(path: &Path) -> Result<String, ProcReadError> {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .map_err(|e| ProcReadError::from_io(path, e))
}

/// Reads and parses `task/<tid>/stat` of process `pid`.
pub(crate) fn read_task_stat(
    proc_root: &Path,
    pid: u32,
    tid: u32,
) -> Result<TaskStat, ProcReadError> {
    let path = task_file(proc_root, pid, tid, "stat");
    let text = read_text_lossy(&path)?;
    parse_stat(&text).map_err(|what| ProcReadError::Malformed { path, what })
}

/// Reads a thread's `Cpus_allowed_list` (its affinity mask, which also
/// reflects its cpuset).
pub(crate) fn read_cpus_allowed(
    proc_root: &Path,
    pid: u32,
    tid: u32,
) -> Result<CpuSet, ProcReadError> {
    let path = task_file(proc_root, pid, tid, "status");
    let text = read_text(&path)?;
    parse_status_cpus_allowed(&text).map_err(|what| ProcReadError::Malformed { path, what })
}

/// Reads the CPU a thread last ran on (stat field 39).
pub(crate) fn read_last_cpu(
    proc_root: &Path,
    pid: u32,
    tid: u32,
) -> Result<Option<u32>, ProcReadError> {
    Ok(read_task_stat(proc_root, pid, tid)?.last_cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCPU_STAT: &str = "7014 (CPU 0/KVM) S 1 7012 7012 0 -1 4194368 9 0 0 0 51 1 0 0 20 0 5 0 12345 205944 577 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 -1 1 0 0 0 0 0 0 0 0 0 0 0 0 0";

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let s = parse_stat(VCPU_STAT).unwrap();
        assert_eq!(s.comm, "CPU 0/KVM");
        assert_eq!(s.state, 'S');
        assert_eq!(s.flags, 4194368);
        assert_eq!(s.start_time, 12345);
        assert_eq!(s.last_cpu, Some(1));
        assert!(!s.is_kernel_worker());

        let odd = VCPU_STAT.replace("(CPU 0/KVM)", "(a) b) (c)");
        assert_eq!(parse_stat(&odd).unwrap().comm, "a) b) (c");
    }

    #[test]
    fn workers_and_bad_stat() {
        let nx = VCPU_STAT
            .replace("(CPU 0/KVM)", "(kvm-nx-lpage-re)")
            .replace(" 4194368 ", " 4210752 ");
        assert!(parse_stat(&nx).unwrap().is_kernel_worker());
        assert!(parse_stat("garbage").is_err());
        assert!(parse_stat("1 (x) S 1 2").is_err());
        // Shapes the crate's parser would slice out of bounds.
        for bad in ["(x) S", "1 (x)", "1 (x)S", "1(x) S 1", ")(", "1 (x) \u{e9}"] {
            assert!(parse_stat(bad).is_err(), "{bad:?}");
        }
        assert!(parse_stat("1 (x) S 1 2 3 4 5 notanumber 0 0 0 0 0 0 0 0 0 0 0 0 5").is_err());
        // Field 39 missing (fields up to 37 are mandatory): last CPU
        // unknown, not an error.
        let short: String = VCPU_STAT.split(' ').take(38).collect::<Vec<_>>().join(" ");
        assert_eq!(parse_stat(&short).unwrap().last_cpu, None);
    }

    #[test]
    fn status_and_fds() {
        let st = "Name:\tCPU 0/KVM\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\n";
        assert_eq!(parse_status_cpus_allowed(st).unwrap(), CpuSet::range(0, 1));
        assert!(parse_status_cpus_allowed("Name: x\n").is_err());
        assert!(parse_status_cpus_allowed("Cpus_allowed_list:\tzz\n").is_err());
        assert_eq!(vcpu_fd_index("anon_inode:kvm-vcpu:12"), Some(12));
        assert_eq!(vcpu_fd_index("anon_inode:kvm-vcpu:"), None);
        assert_eq!(vcpu_fd_index("anon_inode:kvm-vm"), None);
        assert!(is_vm_fd("anon_inode:kvm-vm"));
        assert!(!is_vm_fd("/dev/kvm"));
    }

    #[test]
    fn syscall_file() {
        assert_eq!(
            parse_syscall_kvm_run_fd("16 0x7 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f00\n"),
            Some(7)
        );
        assert_eq!(parse_syscall_kvm_run_fd("running\n"), None);
        assert_eq!(
            parse_syscall_kvm_run_fd("16 0x7 0x5401 0 0 0 0 0 0\n"),
            None
        );
        assert_eq!(parse_syscall_kvm_run_fd("230 0x1 0x0 0 0 0 0 0 0\n"), None);
        assert_eq!(parse_syscall_kvm_run_fd(""), None);
    }
}
