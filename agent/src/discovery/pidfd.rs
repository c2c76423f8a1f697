//! Prompt exit notification for discovered VMs with pidfds (Linux >= 5.3).
//!
//! A pidfd refers to one process, not to a pid number, so it cannot be
//! confused by pid reuse once open. The window between discovery and
//! `pidfd_open` is closed by checking the process's start time (stat field
//! 22) after opening: if it differs, the pid already names another process
//! and the VM is reported gone. A pidfd becomes readable when the process
//! exits; [`VmExitWatch::exited`] awaits that in tokio.
//!
//! pidfds name real host processes: with a fake procfs root the start-time
//! check reads the fake tree, so this is for the real `/proc` only.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{DiscoveryError, VmScanner};

/// An open pidfd of a VM process.
#[derive(Debug)]
pub struct VmExitWatch {
    fd: OwnedFd,
}

/// Opens a pidfd with `pidfd_open(2)`.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = i32::try_from(ret).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `raw` is a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl VmExitWatch {
    /// Opens a pidfd for `pid` and checks that it is still the process that
    /// started at `start_time`. `VmGone` when it exited or was replaced;
    /// `Io` (e.g. ENOSYS before Linux 5.3) when pidfds are not available, in
    /// which case the caller relies on periodic scans.
    pub fn open(scanner: &VmScanner, pid: u32, start_time: u64) -> Result<Self, DiscoveryError> {
        let path = scanner.proc_root().join(pid.to_string());
        let fd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => DiscoveryError::VmGone {
                pid,
                path: path.clone(),
            },
            _ => DiscoveryError::Io {
                path: path.join("(pidfd_open)"),
                source: e,
            },
        })?;
        if !scanner.is_same_process(pid, start_time)? {
            return Err(DiscoveryError::VmGone { pid, path });
        }
        Ok(Self { fd })
    }

    /// Whether the process has exited (non-blocking poll of the pidfd).
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    /// Completes when the process exits. Needs a tokio runtime with I/O
    /// enabled.
    pub(crate) async fn exited(self) -> std::io::Result<()> {
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open for its
        // whole lifetime, as registration requires.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self.fd, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)?;
        loop {
            let mut guard = afd.readable().await?;
            let mut pfd = libc::pollfd {
                fd: afd.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n > 0 {
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exit_is_seen_promptly_and_reuse_is_refused() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let scanner = VmScanner::default();
        let st = crate::discovery::procfs::read_task_stat(scanner.proc_root(), pid, pid)
            .unwrap()
            .start_time;
        // A different start time: the pid "names another process".
        assert!(VmExitWatch::open(&scanner, pid, st + 1)
            .unwrap_err()
            .is_gone());
        let watch = VmExitWatch::open(&scanner, pid, st).unwrap();
        assert!(!watch.has_exited());
        let waiter = tokio::spawn(watch.exited());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        let t = std::time::Instant::now();
        child.kill().unwrap();
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("exit seen within 2 s")
            .unwrap()
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        let _ = child.wait();
        assert!(VmExitWatch::open(&scanner, pid, st).unwrap_err().is_gone());
    }
}
