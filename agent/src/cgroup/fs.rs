//! The cgroupfs I/O both hierarchies share: one value per `write(2)`,
//! reads of cpulists, `mkdir` that accepts an existing cgroup, and removal
//! of a cgroup tree children first. Every error names the file and the
//! value written ([`CgroupError::from_io`]).

use std::path::Path;

use super::{CgroupError, CgroupWrite, Target};
use crate::CpuSet;

/// Writes `value` to `file` in one `write(2)` (cgroupfs takes one value per
/// write; `std::fs::write` issues one) and appends it to `log`. `on_thread`:
/// the value is a thread or process id, so ENOENT means it is gone.
pub(crate) fn write(
    file: &Path,
    value: &str,
    on_thread: bool,
    log: &mut Vec<CgroupWrite>,
) -> Result<(), CgroupError> {
    std::fs::write(file, value)
        .map_err(|e| CgroupError::from_io(Target::File(file.to_path_buf()), value, on_thread, e))?;
    tracing::debug!(file = %file.display(), value, "cgroup write");
    log.push(CgroupWrite {
        file: file.to_path_buf(),
        value: value.to_string(),
    });
    Ok(())
}

/// Reads `file` whole.
pub(crate) fn read(file: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(file)
        .map_err(|e| CgroupError::from_io(Target::File(file.to_path_buf()), "", false, e))
}

/// Reads a cpulist file (`cpuset.cpus`, `cpuset.mems`, effective sets).
pub(crate) fn read_set(file: &Path) -> Result<CpuSet, CgroupError> {
    let text = read(file)?;
    CpuSet::parse(text.trim()).map_err(|e| CgroupError::Malformed {
        target: Target::File(file.to_path_buf()),
        what: e.to_string(),
    })
}

/// Creates the cgroup directory `dir`; `Ok(false)` when it exists.
pub(crate) fn mkdir(dir: &Path) -> Result<bool, CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(CgroupError::from_io(
            Target::File(dir.to_path_buf()),
            "",
            false,
            e,
        )),
    }
}

/// Removes the cgroup `dir` and its child cgroups, children first; a
/// missing directory is not an error.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn remove_dir_tree(dir: &Path) -> Result<(), CgroupError> {
    let io_err =
        |dir: &Path, e| CgroupError::from_io(Target::File(dir.to_path_buf()), "", false, e);
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir, e)),
    };
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_dir_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir, e)),
    }
}
