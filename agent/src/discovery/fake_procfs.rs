//! Builds a fake procfs tree in a directory, with the files discovery reads:
//! `<pid>/{stat,cmdline,cgroup,fd/N}` and `<pid>/task/<tid>/{stat,status,
//! cgroup,syscall}`. fds are symlinks whose targets are the strings the
//! kernel shows (`anon_inode:kvm-vm`). Used by unit tests, integration tests
//! and benchmarks of the reconcile loop against a fake host.

use std::io;
use std::path::{Path, PathBuf};

/// One thread of a fake process.
#[derive(Debug, Clone)]
pub(crate) struct FakeThread {
    /// Thread id.
    pub(crate) tid: u32,
    /// `comm` (stat field 2).
    pub(crate) comm: String,
    /// `PF_*` flags (stat field 9).
    pub(crate) flags: u64,
    /// `Cpus_allowed_list` of `task/<tid>/status`, a cpulist.
    pub(crate) cpus_allowed: String,
    /// The CPU the thread last ran on (stat field 39).
    pub(crate) last_cpu: u32,
    /// Content of `task/<tid>/cgroup`.
    pub(crate) cgroup: String,
    /// Content of `task/<tid>/syscall`.
    pub(crate) syscall: String,
}

impl FakeThread {
    /// A thread `tid` named `comm` on CPUs 0-3, in the root cgroup, running.
    pub(crate) fn new(tid: u32, comm: &str) -> Self {
        Self {
            tid,
            comm: comm.to_string(),
            flags: 0x0040_0040,
            cpus_allowed: "0-3".to_string(),
            last_cpu: 0,
            cgroup: "0::/\n".to_string(),
            syscall: "running\n".to_string(),
        }
    }
}

/// One fake process.
#[derive(Debug, Clone)]
pub struct FakeProcess {
    /// Process id.
    pub(crate) pid: u32,
    /// Stat field 22 (start time in clock ticks).
    pub(crate) start_time: u64,
    /// Arguments of `<pid>/cmdline`.
    pub(crate) cmdline: Vec<String>,
    /// Content of `<pid>/cgroup`.
    pub cgroup: String,
    /// `(fd number, link target)`.
    pub(crate) fds: Vec<(u32, String)>,
    /// Threads; the one with `tid == pid` is the main thread.
    pub(crate) threads: Vec<FakeThread>,
}

impl FakeProcess {
    /// A KVM VM process in QEMU's shape: main thread, `CPU N/KVM` threads
    /// with tids `pid+1..`, one I/O thread and KVM's NX recovery worker.
    pub fn qemu_vm(pid: u32, vcpus: u32, cmdline: &[&str]) -> Self {
        let mut fds = vec![
            (0, "/dev/null".to_string()),
            (10, "/dev/kvm".to_string()),
            (11, "anon_inode:kvm-vm".to_string()),
        ];
        let mut threads = vec![FakeThread::new(pid, "qemu-system-x86")];
        threads.push(FakeThread::new(pid + 1, "call_rcu"));
        for i in 0..vcpus {
            fds.push((20 + i, format!("anon_inode:kvm-vcpu:{i}")));
            threads.push(FakeThread::new(pid + 2 + i, &format!("CPU {i}/KVM")));
        }
        let mut nx = FakeThread::new(pid + 2 + vcpus, "kvm-nx-lpage-re");
        nx.flags = 0x0040_4040;
        threads.push(nx);
        Self {
            pid,
            start_time: 1000 + u64::from(pid),
            cmdline: cmdline.iter().map(|s| s.to_string()).collect(),
            cgroup: "0::/\n".to_string(),
            fds,
            threads,
        }
    }

    /// A process that is not a VM.
    pub fn plain(pid: u32, comm: &str) -> Self {
        Self {
            pid,
            start_time: 500,
            cmdline: vec![comm.to_string()],
            cgroup: "0::/\n".to_string(),
            fds: vec![(0, "/dev/null".to_string())],
            threads: vec![FakeThread::new(pid, comm)],
        }
    }
}

/// Renders a stat line with the given fields (others zero).
pub(crate) fn stat_line(
    pid: u32,
    comm: &str,
    flags: u64,
    start_time: u64,
    last_cpu: u32,
) -> String {
    // Fields 3..=52; index i holds field i + 3.
    let mut f: Vec<String> = vec!["0".to_string(); 50];
    f[0] = "S".to_string();
    f[9 - 3] = flags.to_string();
    f[22 - 3] = start_time.to_string();
    f[39 - 3] = last_cpu.to_string();
    format!("{pid} ({comm}) {}\n", f.join(" "))
}

/// Writes `p` under `root` (which stands for `/proc`).
pub fn write_process(root: &Path, p: &FakeProcess) -> io::Result<PathBuf> {
    let dir = root.join(p.pid.to_string());
    std::fs::create_dir_all(dir.join("fd"))?;
    std::fs::create_dir_all(dir.join("task"))?;
    let main_comm = p
        .threads
        .iter()
        .find(|t| t.tid == p.pid)
        .map(|t| t.comm.clone())
        .unwrap_or_default();
    std::fs::write(
        dir.join("stat"),
        stat_line(p.pid, &main_comm, 0x0040_0000, p.start_time, 0),
    )?;
    let mut cmd = p.cmdline.join("\0");
    if !cmd.is_empty() {
        cmd.push('\0');
    }
    std::fs::write(dir.join("cmdline"), cmd)?;
    std::fs::write(dir.join("cgroup"), &p.cgroup)?;
    for (fd, target) in &p.fds {
        std::os::unix::fs::symlink(target, dir.join("fd").join(fd.to_string()))?;
    }
    for t in &p.threads {
        write_thread(root, p.pid, p.start_time, t)?;
    }
    Ok(dir)
}

/// Writes (or rewrites) one thread of process `pid`.
pub(crate) fn write_thread(
    root: &Path,
    pid: u32,
    start_time: u64,
    t: &FakeThread,
) -> io::Result<()> {
    let tdir = root
        .join(pid.to_string())
        .join("task")
        .join(t.tid.to_string());
    std::fs::create_dir_all(&tdir)?;
    std::fs::write(
        tdir.join("stat"),
        stat_line(t.tid, &t.comm, t.flags, start_time, t.last_cpu),
    )?;
    std::fs::write(
        tdir.join("status"),
        format!(
            "Name:\t{}\nTgid:\t{pid}\nPid:\t{}\nCpus_allowed_list:\t{}\n",
            t.comm, t.tid, t.cpus_allowed
        ),
    )?;
    std::fs::write(tdir.join("cgroup"), &t.cgroup)?;
    std::fs::write(tdir.join("syscall"), &t.syscall)?;
    Ok(())
}
