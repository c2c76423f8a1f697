//! The Placement consumers of this agent's VMs, kept in
//! `<state dir>/fleet-consumers.json` (write, fsync, rename, fsync(dir)),
//! so a restart, even after `kill -9`, knows whose allocations to keep
//! true and whose to remove.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::tree::Consumer;
use crate::types::VmId;

/// File name inside the state directory.
pub(crate) const FILE_NAME: &str = "fleet-consumers.json";
const VERSION: u32 = 1;

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerStoreError {
    /// The store file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The store file.
        path: PathBuf,
        /// What reading it returned.
        source: std::io::Error,
    },
    /// The store file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The store file.
        path: PathBuf,
        /// What writing it returned.
        source: std::io::Error,
    },
    /// The file's content is not a consumer store.
    #[error("{path} is not a fleet consumer file: {reason}")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What is wrong with the content.
        reason: String,
    },
    /// The file has a version this agent does not know.
    #[error("{path} has version {found}; this agent knows version {VERSION}")]
    Version {
        /// The store file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileFormat {
    version: u32,
    /// By VM id.
    consumers: BTreeMap<String, Consumer>,
    /// Consumers replaced by another for the same VM: their allocations on
    /// this host are removed at the next sync.
    #[serde(default)]
    retired: Vec<Consumer>,
}

/// The consumers, in memory and on disk.
#[derive(Debug)]
pub(crate) struct ConsumerStore {
    path: PathBuf,
    by_vm: BTreeMap<VmId, Consumer>,
    retired: Vec<Consumer>,
}

impl ConsumerStore {
    /// Loads the file in `dir` (missing: no consumers).
    pub(crate) fn load(dir: &Path) -> Result<Self, ConsumerStoreError> {
        let path = dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path,
                    by_vm: BTreeMap::new(),
                    retired: Vec::new(),
                })
            }
            Err(source) => return Err(ConsumerStoreError::Read { path, source }),
        };
        let f: FileFormat =
            serde_json::from_str(&text).map_err(|e| ConsumerStoreError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if f.version != VERSION {
            return Err(ConsumerStoreError::Version {
                path,
                found: f.version,
            });
        }
        let mut by_vm = BTreeMap::new();
        for (id, c) in f.consumers {
            let vm = VmId::new(&id).map_err(|e| ConsumerStoreError::Corrupt {
                path: path.clone(),
                reason: format!("vm id {id:?}: {e}"),
            })?;
            by_vm.insert(vm, c);
        }
        Ok(Self {
            path,
            by_vm,
            retired: f.retired,
        })
    }

    fn save(&self) -> Result<(), ConsumerStoreError> {
        let f = FileFormat {
            version: VERSION,
            consumers: self
                .by_vm
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            retired: self.retired.clone(),
        };
        let write = |source| ConsumerStoreError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(write)?;
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&f).unwrap_or_default();
        let mut file = std::fs::File::create(&tmp).map_err(write)?;
        file.write_all(&text).map_err(write)?;
        file.sync_all().map_err(write)?;
        std::fs::rename(&tmp, &self.path).map_err(write)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
        Ok(())
    }

    /// The consumer of each VM, by VM id.
    pub(crate) fn consumers(&self) -> &BTreeMap<VmId, Consumer> {
        &self.by_vm
    }

    pub(crate) fn retired(&self) -> &[Consumer] {
        &self.retired
    }

    /// The consumer of `vm`.
    pub(crate) fn get(&self, vm: &VmId) -> Option<&Consumer> {
        self.by_vm.get(vm)
    }

    /// Records `vm`'s consumer (written before the call returns). A
    /// different consumer recorded before for `vm` is retired.
    pub(crate) fn record(
        &mut self,
        vm: &VmId,
        consumer: Consumer,
    ) -> Result<(), ConsumerStoreError> {
        let before = (self.by_vm.clone(), self.retired.clone());
        if let Some(old) = self.by_vm.insert(vm.clone(), consumer.clone()) {
            if old != consumer {
                self.retired.retain(|c| c.uuid != consumer.uuid);
                self.retired.push(old);
            }
        }
        self.retired.retain(|c| c.uuid != consumer.uuid);
        self.save().inspect_err(|_| {
            (self.by_vm, self.retired) = before;
        })
    }

    /// Drops `vm`'s consumer without retiring it (a PlaceVm that failed).
    pub(crate) fn unrecord(&mut self, vm: &VmId) -> Result<(), ConsumerStoreError> {
        if self.by_vm.remove(vm).is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// Forgets consumers whose allocations on this host are gone.
    pub(crate) fn forget(&mut self, uuids: &[String]) -> Result<(), ConsumerStoreError> {
        let before = self.by_vm.len() + self.retired.len();
        self.by_vm.retain(|_, c| !uuids.contains(&c.uuid));
        self.retired.retain(|c| !uuids.contains(&c.uuid));
        if self.by_vm.len() + self.retired.len() != before {
            self.save()?;
        }
        Ok(())
    }
}
