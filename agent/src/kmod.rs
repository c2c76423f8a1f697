//! Client of the sevflush kernel module's sysfs ABI (`/sys/kernel/sevflush`,
//! see docs/abi.md), read from an injectable root.
//!
//! A missing module is a state, not an error; an ABI version this agent
//! does not know turns module features off with a message naming both
//! versions.

use std::path::{Path, PathBuf};

use crate::cpuset::{CpuListError, CpuSet};

/// The sysfs ABI versions this agent speaks.
pub(crate) const SUPPORTED_ABI: &[u32] = &[1];

/// Why a module file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// A module file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it returned.
        source: std::io::Error,
    },
    /// A module file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What writing it returned.
        source: std::io::Error,
    },
    /// A module file holds a value outside the ABI.
    #[error("bad value {value:?} in {path}: {reason}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The value read.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A module file holds a bad cpulist.
    #[error("bad cpulist in {path}: {source}")]
    CpuList {
        /// The file.
        path: PathBuf,
        /// What the cpulist parser reported.
        source: CpuListError,
    },
    /// The module speaks an ABI version this agent does not.
    #[error("sevflush ABI version {found} is not supported (this agent speaks {supported:?})")]
    AbiMismatch {
        /// The module's ABI version.
        found: u32,
        /// The versions this agent speaks.
        supported: Vec<u32>,
    },
    /// The module's sysfs directory does not exist.
    #[error("the sevflush module is not loaded ({0} does not exist)")]
    Absent(PathBuf),
}

/// Whether module features are available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleState {
    /// No `/sys/kernel/sevflush` directory.
    Absent,
    /// Loaded, with an ABI version this agent speaks.
    Loaded,
    /// Loaded, with an ABI version this agent does not speak.
    AbiMismatch,
    /// Loaded, but a file could not be read or parsed.
    Error,
}

/// Module state and global counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleStatus {
    /// Whether the module's features are available.
    pub state: ModuleState,
    /// `abi_version` (0 when it could not be read).
    pub abi_version: u32,
    /// `mode`: `observe` or `targeted` (empty when not read).
    pub mode: String,
    /// `flushes_total`: targeted flushes.
    pub flushes_total: u64,
    /// `flushed_cpus_total`: CPUs flushed by targeted flushes.
    pub flushed_cpus_total: u64,
    /// `full_flushes_total`: flushes wider than a VM's dirty set.
    pub full_flushes_total: u64,
    /// `scrubs_total`: flushes asked for through `vms/<id>/scrub`.
    pub scrubs_total: u64,
    /// `scrubbed_cpus_total`: CPUs flushed by scrubs.
    pub scrubbed_cpus_total: u64,
    /// What kept the state from `Loaded` (empty when loaded).
    pub message: String,
}

impl ModuleStatus {
    fn without_counters(state: ModuleState, abi_version: u32, message: String) -> Self {
        Self {
            state,
            abi_version,
            mode: String::new(),
            flushes_total: 0,
            flushed_cpus_total: 0,
            full_flushes_total: 0,
            scrubs_total: 0,
            scrubbed_cpus_total: 0,
            message,
        }
    }
}

/// One VM record of the module.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ModuleVm {
    /// The record's id (its directory under `vms/`).
    pub(crate) id: u64,
    /// `pid`: the process that created the VM.
    pub(crate) pid: u32,
    /// `dirty_cpus`: CPUs that entered the guest since their last flush.
    pub(crate) dirty_cpus: CpuSet,
    /// `ran_cpus`: CPUs that ever entered the guest while the module was loaded.
    pub(crate) ran_cpus: CpuSet,
    /// `flushes`: targeted flushes of this VM.
    pub(crate) flushes: u64,
    /// `flushed_cpus`: CPUs flushed by those flushes.
    pub(crate) flushed_cpus: u64,
    /// `confidential`: the label the agent wrote.
    pub(crate) confidential: String,
    /// `None` when the module does not export `unknown_past`.
    pub(crate) unknown_past: Option<bool>,
}

/// Reads the module's sysfs tree.
#[derive(Debug, Clone)]
pub struct ModuleReader {
    dir: PathBuf,
}

/// A fault in the content of one module file, before its path is attached
/// (see [`ValueError::at`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ValueError {
    /// A value outside the ABI.
    #[error("bad value {value:?}: {reason}")]
    Value {
        /// The value read.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bad cpulist.
    #[error("bad cpulist: {0}")]
    CpuList(#[from] CpuListError),
}

impl ValueError {
    /// The [`ModuleError`] for this fault in the file at `path`.
    pub(crate) fn at(self, path: PathBuf) -> ModuleError {
        match self {
            Self::Value { value, reason } => ModuleError::Value {
                path,
                value,
                reason,
            },
            Self::CpuList(source) => ModuleError::CpuList { path, source },
        }
    }
}

/// The value of a sysfs file: its text without trailing newlines.
pub(crate) fn file_value(text: &str) -> &str {
    text.trim_end_matches('\n')
}

/// Parses an unsigned counter file (`flushes_total`, `vms/<id>/flushes`, ...).
pub(crate) fn parse_u64(text: &str) -> Result<u64, ValueError> {
    let v = file_value(text);
    v.parse().map_err(|_| ValueError::Value {
        value: v.to_string(),
        reason: "not an unsigned integer",
    })
}

/// Parses `abi_version`; whether the version is supported is checked by
/// [`ModuleReader::abi_version`].
pub(crate) fn parse_abi_version(text: &str) -> Result<u32, ValueError> {
    let v = parse_u64(text)?;
    u32::try_from(v).map_err(|_| ValueError::Value {
        value: v.to_string(),
        reason: "out of range",
    })
}

/// Parses `mode`: `observe` or `targeted`.
pub(crate) fn parse_mode(text: &str) -> Result<String, ValueError> {
    match file_value(text) {
        m @ ("observe" | "targeted") => Ok(m.to_string()),
        m => Err(ValueError::Value {
            value: m.to_string(),
            reason: "not observe or targeted",
        }),
    }
}

/// Parses `vms/<id>/pid`.
pub(crate) fn parse_pid(text: &str) -> Result<u32, ValueError> {
    let v = parse_u64(text)?;
    u32::try_from(v).map_err(|_| ValueError::Value {
        value: v.to_string(),
        reason: "pid out of range",
    })
}

/// Parses a cpulist file (`vms/<id>/dirty_cpus`, `vms/<id>/ran_cpus`).
pub(crate) fn parse_cpulist(text: &str) -> Result<CpuSet, ValueError> {
    Ok(CpuSet::parse(file_value(text))?)
}

/// Parses `vms/<id>/unknown_past`: `1` is true, anything else false.
pub(crate) fn parse_unknown_past(text: &str) -> bool {
    file_value(text) == "1"
}

/// The record id of a `vms/` entry name, when it is one.
pub(crate) fn parse_record_name(name: &str) -> Option<u64> {
    name.parse().ok()
}

fn read_text(path: &Path) -> Result<String, ModuleError> {
    std::fs::read_to_string(path).map_err(|source| ModuleError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl ModuleError {
    /// Whether the error means the file or directory went away while it
    /// was read: the module was unloaded (sysfs answers ENODEV for an open
    /// file of a removed kobject, ENOENT afterwards) or, for a VM record,
    /// the VM was destroyed.
    pub(crate) fn is_vanished(&self) -> bool {
        match self {
            Self::Absent(_) => true,
            Self::Read { source, .. } => {
                source.kind() == std::io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ENODEV)
            }
            _ => false,
        }
    }
}

fn read_value(path: &Path) -> Result<String, ModuleError> {
    read_text(path).map(|s| file_value(&s).to_string())
}

/// Reads the file at `path` and parses it with `parse`.
fn read_parsed<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, ValueError>,
) -> Result<T, ModuleError> {
    parse(&read_text(path)?).map_err(|e| e.at(path.to_path_buf()))
}

fn read_u64(path: &Path) -> Result<u64, ModuleError> {
    read_parsed(path, parse_u64)
}

impl ModuleReader {
    /// `dir` is the module's directory, normally `/sys/kernel/sevflush`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Reads and checks `abi_version`.
    pub(crate) fn abi_version(&self) -> Result<u32, ModuleError> {
        if !self.dir.exists() {
            return Err(ModuleError::Absent(self.dir.clone()));
        }
        let v = read_parsed(&self.dir.join("abi_version"), parse_abi_version)?;
        if !SUPPORTED_ABI.contains(&v) {
            return Err(ModuleError::AbiMismatch {
                found: v,
                supported: SUPPORTED_ABI.to_vec(),
            });
        }
        Ok(v)
    }

    fn read_status(&self, abi: u32) -> Result<ModuleStatus, ModuleError> {
        let mode = read_parsed(&self.dir.join("mode"), parse_mode)?;
        let n = |name: &str| read_u64(&self.dir.join(name));
        Ok(ModuleStatus {
            state: ModuleState::Loaded,
            abi_version: abi,
            mode,
            flushes_total: n("flushes_total")?,
            flushed_cpus_total: n("flushed_cpus_total")?,
            full_flushes_total: n("full_flushes_total")?,
            scrubs_total: n("scrubs_total")?,
            scrubbed_cpus_total: n("scrubbed_cpus_total")?,
            message: String::new(),
        })
    }

    /// The module's state; never fails: problems become the state and its
    /// message.
    pub(crate) fn status(&self) -> ModuleStatus {
        match self.abi_version().and_then(|abi| self.read_status(abi)) {
            Ok(s) => s,
            Err(e @ ModuleError::Absent(_)) => {
                ModuleStatus::without_counters(ModuleState::Absent, 0, e.to_string())
            }
            // Unloaded (or loading) between two reads.
            Err(e) if e.is_vanished() => ModuleStatus::without_counters(
                ModuleState::Absent,
                0,
                format!("the sevflush module went away while it was read ({e})"),
            ),
            Err(e @ ModuleError::AbiMismatch { found, .. }) => {
                ModuleStatus::without_counters(ModuleState::AbiMismatch, found, e.to_string())
            }
            Err(e) => ModuleStatus::without_counters(ModuleState::Error, 0, e.to_string()),
        }
    }

    /// Every VM record (`vms/<id>/`), ordered by id. A record that vanishes
    /// while it is read (its VM was destroyed) is left out; the module
    /// vanishing as a whole is `Absent`.
    pub(crate) fn vm_records(&self) -> Result<Vec<ModuleVm>, ModuleError> {
        let absent = |e: ModuleError| {
            if e.is_vanished() {
                ModuleError::Absent(self.dir.clone())
            } else {
                e
            }
        };
        self.abi_version().map_err(absent)?;
        let dir = self.dir.join("vms");
        let entries = std::fs::read_dir(&dir)
            .map_err(|source| ModuleError::Read {
                path: dir.clone(),
                source,
            })
            .map_err(absent)?;
        let mut ids: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(parse_record_name))
            .collect();
        ids.sort_unstable();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.vm_record(id) {
                Ok(r) => out.push(r),
                Err(e) if e.is_vanished() => {}
                Err(e) => return Err(e),
            }
        }
        // Records read while the module went away are not kept.
        if !self.dir.join("abi_version").exists() {
            return Err(ModuleError::Absent(self.dir.clone()));
        }
        Ok(out)
    }

    /// One VM record.
    pub(crate) fn vm_record(&self, id: u64) -> Result<ModuleVm, ModuleError> {
        let rel = |f: &str| format!("vms/{id}/{f}");
        let n = |f: &str| read_u64(&self.dir.join(rel(f)));
        let pid = read_parsed(&self.dir.join(rel("pid")), parse_pid)?;
        let unknown_past = match read_text(&self.dir.join(rel("unknown_past"))) {
            Ok(v) => Some(parse_unknown_past(&v)),
            Err(ModuleError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        Ok(ModuleVm {
            id,
            pid,
            dirty_cpus: self.read_cpulist(&rel("dirty_cpus"))?,
            ran_cpus: self.read_cpulist(&rel("ran_cpus"))?,
            flushes: n("flushes")?,
            flushed_cpus: n("flushed_cpus")?,
            confidential: read_value(&self.dir.join(rel("confidential")))?,
            unknown_past,
        })
    }

    /// Writes the agent's classification to `vms/<id>/confidential`.
    pub(crate) fn set_confidential(
        &self,
        id: u64,
        class: crate::types::ConfidentialClass,
    ) -> Result<(), ModuleError> {
        let path = self.dir.join(format!("vms/{id}/confidential"));
        std::fs::write(&path, format!("{}\n", class.as_str()))
            .map_err(|source| ModuleError::Write { path, source })
    }

    /// Asks the module to flush the VM's dirty set now (`vms/<id>/scrub`).
    pub(crate) fn scrub(&self, id: u64) -> Result<(), ModuleError> {
        let path = self.dir.join(format!("vms/{id}/scrub"));
        std::fs::write(&path, "1\n").map_err(|source| ModuleError::Write { path, source })
    }

    /// Reads a cpulist file of a VM record (`dirty_cpus`, `ran_cpus`).
    pub(crate) fn read_cpulist(&self, rel: &str) -> Result<CpuSet, ModuleError> {
        read_parsed(&self.dir.join(rel), parse_cpulist)
    }
}

/// Writes sevflush ABI v1 trees for tests and benchmarks that run against
/// a fake host root (as `discovery::fake_procfs` does for procfs); not in
/// the daemon's build.
#[cfg(any(test, feature = "testing"))]
pub mod fake_tree {
    use std::io;
    use std::path::Path;

    fn put(path: &Path, value: &str) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, format!("{value}\n"))
    }

    /// The module-wide files: ABI 1, `mode`, and the global counters
    /// `(flushes, flushed_cpus, full_flushes, scrubs, scrubbed_cpus)`.
    pub fn write_globals(root: &Path, mode: &str, counters: [u64; 5]) -> io::Result<()> {
        put(&root.join("abi_version"), "1")?;
        put(&root.join("mode"), mode)?;
        let names = [
            "flushes_total",
            "flushed_cpus_total",
            "full_flushes_total",
            "scrubs_total",
            "scrubbed_cpus_total",
        ];
        for (name, v) in names.iter().zip(counters) {
            put(&root.join(name), &v.to_string())?;
        }
        Ok(())
    }

    /// One VM record `vms/<id>/`; `confidential` is written only when the
    /// file does not exist yet (the agent owns it afterwards).
    pub fn write_record(
        root: &Path,
        id: u64,
        pid: u32,
        dirty_cpus: &str,
        ran_cpus: &str,
        flushes: u64,
        flushed_cpus: u64,
    ) -> io::Result<()> {
        let dir = root.join(format!("vms/{id}"));
        put(&dir.join("pid"), &pid.to_string())?;
        put(&dir.join("dirty_cpus"), dirty_cpus)?;
        put(&dir.join("ran_cpus"), ran_cpus)?;
        put(&dir.join("flushes"), &flushes.to_string())?;
        put(&dir.join("flushed_cpus"), &flushed_cpus.to_string())?;
        if !dir.join("confidential").exists() {
            put(&dir.join("confidential"), "unknown")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, v) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        }
        d
    }

    const GOOD: &[(&str, &str)] = &[
        ("abi_version", "1\n"),
        ("mode", "targeted\n"),
        ("flushes_total", "10\n"),
        ("flushed_cpus_total", "40\n"),
        ("full_flushes_total", "2\n"),
        ("scrubs_total", "1\n"),
        ("scrubbed_cpus_total", "4\n"),
        ("vms/1/dirty_cpus", "0-3,8\n"),
        ("vms/1/ran_cpus", "\n"),
        ("vms/1/pid", "4242\n"),
        ("vms/1/flushes", "3\n"),
        ("vms/1/flushed_cpus", "12\n"),
        ("vms/1/confidential", "unknown\n"),
        ("vms/1/scrub", ""),
    ];

    #[test]
    fn loaded_module() {
        let d = tree(GOOD);
        let r = ModuleReader::new(d.path());
        let s = r.status();
        assert_eq!(s.state, ModuleState::Loaded, "{}", s.message);
        assert_eq!(
            (s.mode.as_str(), s.flushes_total, s.full_flushes_total),
            ("targeted", 10, 2)
        );
        assert_eq!(
            r.read_cpulist("vms/1/dirty_cpus").unwrap().to_string(),
            "0-3,8"
        );
        assert!(r.read_cpulist("vms/1/ran_cpus").unwrap().is_empty());
        let vms = r.vm_records().unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(
            (vms[0].pid, vms[0].flushes, vms[0].flushed_cpus),
            (4242, 3, 12)
        );
        assert_eq!(vms[0].unknown_past, None);
        r.set_confidential(1, crate::types::ConfidentialClass::SevEs)
            .unwrap();
        assert_eq!(r.vm_record(1).unwrap().confidential, "sev-es");
        r.scrub(1).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("vms/1/scrub")).unwrap(),
            "1\n"
        );
    }

    #[test]
    fn absent_mismatch_and_garbage() {
        let r = ModuleReader::new("/nonexistent/sevflush");
        assert_eq!(r.status().state, ModuleState::Absent);

        let d = tree(&[("abi_version", "7\n")]);
        let s = ModuleReader::new(d.path()).status();
        assert_eq!((s.state, s.abi_version), (ModuleState::AbiMismatch, 7));
        assert!(s.message.contains("ABI version 7"), "{}", s.message);

        let mut files = GOOD.to_vec();
        files[2] = ("flushes_total", "lots\n");
        let d = tree(&files);
        let s = ModuleReader::new(d.path()).status();
        assert_eq!(s.state, ModuleState::Error);
        assert!(s.message.contains("flushes_total"), "{}", s.message);

        let mut files = GOOD.to_vec();
        files[7] = ("vms/1/dirty_cpus", "0-\n");
        let d = tree(&files);
        let e = ModuleReader::new(d.path())
            .read_cpulist("vms/1/dirty_cpus")
            .unwrap_err();
        assert!(e.to_string().contains("dirty_cpus"), "{e}");
    }

    /// The module unloads and loads again while the agent reads it: the
    /// whole tree appears and vanishes at once (as kernfs removes a
    /// kobject's directory), here by renames. Every read is the module
    /// loaded with complete records, or absent; never an error state, never
    /// a record with missing fields.
    #[test]
    fn unload_mid_read_is_absent_never_an_error() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let base = tempfile::tempdir().unwrap();
        let live = base.path().join("sevflush");
        let stop = Arc::new(AtomicBool::new(false));
        let toggler = {
            let (base, live, stop) = (base.path().to_path_buf(), live.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let stage = base.join(format!("stage-{i}"));
                    fake_tree::write_globals(&stage, "targeted", [1, 2, 3, 4, 5]).unwrap();
                    for id in 1..=8u64 {
                        fake_tree::write_record(
                            &stage,
                            id,
                            1000 + u32::try_from(id).unwrap(),
                            "0-3",
                            "0-7",
                            id,
                            id,
                        )
                        .unwrap();
                    }
                    std::fs::rename(&stage, &live).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    let gone = base.join(format!("gone-{i}"));
                    std::fs::rename(&live, &gone).unwrap();
                    std::fs::remove_dir_all(&gone).unwrap();
                    i += 1;
                }
            })
        };
        let reader = ModuleReader::new(&live);
        let (mut loaded, mut absent, mut records) = (0, 0, 0);
        let started = std::time::Instant::now();
        // Until both states were seen often (the bound only ends a broken
        // toggler).
        while (loaded < 200 || absent < 200 || records == 0)
            && started.elapsed() < std::time::Duration::from_secs(60)
        {
            let st = reader.status();
            match st.state {
                ModuleState::Loaded => {
                    loaded += 1;
                    assert_eq!(st.mode, "targeted");
                    assert_eq!(st.scrubbed_cpus_total, 5);
                }
                ModuleState::Absent => absent += 1,
                other => panic!("{other:?}: {}", st.message),
            }
            match reader.vm_records() {
                Ok(rs) => {
                    assert!(rs.len() <= 8);
                    for r in rs {
                        records += 1;
                        assert_eq!(r.pid, 1000 + u32::try_from(r.id).unwrap());
                        assert_eq!(r.dirty_cpus, CpuSet::range(0, 3));
                        assert_eq!(r.ran_cpus, CpuSet::range(0, 7));
                        assert_eq!((r.flushes, r.flushed_cpus), (r.id, r.id));
                    }
                }
                Err(ModuleError::Absent(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        toggler.join().unwrap();
        assert!(
            loaded > 0 && absent > 0 && records > 0,
            "both states seen: loaded {loaded}, absent {absent}, records {records}"
        );
    }
}
