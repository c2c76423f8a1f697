//! Host CPU topology read from a sysfs tree: online CPUs, SMT siblings
//! (physical cores), L3 domains, NUMA nodes and isolated CPUs.
//!
//! The root is a parameter (`/sys` on a host, a fixture in tests). Every
//! read error names the file. L3 domains come from the `cache/index*`
//! entry whose `level` is 3; a CPU without L3 information is given the
//! domain of its package, so each domain is computed from what the kernel
//! reports for it, never from an average.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cpuset::{CpuListError, CpuSet};

/// Why the topology could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A sysfs file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it returned.
        source: std::io::Error,
    },
    /// A sysfs file holds a bad cpulist.
    #[error("bad cpulist in {path}: {source}")]
    CpuList {
        /// The file.
        path: PathBuf,
        /// What the cpulist parser reported.
        source: CpuListError,
    },
    /// A sysfs file holds a value that is not what the kernel writes there.
    #[error("bad value {value:?} in {path}: {reason}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The value read.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The host root has no online CPU.
    #[error("no online CPUs under {0}")]
    NoCpus(PathBuf),
}

/// One online logical CPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Cpu {
    /// Kernel CPU id.
    pub(crate) id: u32,
    /// Index into [`Topology::cores`].
    pub core: usize,
    /// Index into [`Topology::l3_domains`].
    pub(crate) l3: usize,
    /// NUMA node id.
    pub(crate) numa: u32,
    /// Physical package (socket) id.
    pub(crate) package: u32,
}

/// One physical core: the SMT siblings that share it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Core {
    /// Position in [`Topology::cores`].
    pub(crate) index: usize,
    /// Online SMT siblings of the core.
    pub cpus: CpuSet,
    /// Index into [`Topology::l3_domains`].
    pub l3: usize,
    /// NUMA node id.
    pub(crate) numa: u32,
    /// Physical package (socket) id.
    pub(crate) package: u32,
}

/// The CPUs that share one L3 cache (a CCX on AMD EPYC).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct L3Domain {
    /// Position in [`Topology::l3_domains`], ordered by lowest CPU id.
    pub index: usize,
    /// Online CPUs of the domain.
    pub cpus: CpuSet,
    /// Indices into [`Topology::cores`].
    pub(crate) cores: Vec<usize>,
    /// NUMA node of the domain's lowest CPU.
    pub(crate) numa: u32,
    /// Physical package (socket) of the domain's lowest CPU.
    pub(crate) package: u32,
    /// False when sysfs had no L3 entry and the package stood in for it.
    pub(crate) from_cache_info: bool,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NumaNode {
    /// NUMA node id.
    pub id: u32,
    /// Online CPUs of the node.
    pub cpus: CpuSet,
    /// Indices into [`Topology::l3_domains`] whose first CPU is on this node.
    pub l3_domains: Vec<usize>,
}

/// The host's CPU topology.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Topology {
    /// Online CPUs.
    pub online: CpuSet,
    /// Online CPUs the kernel lists in `devices/system/cpu/isolated` (`isolcpus`).
    pub isolated: CpuSet,
    /// Online CPUs, ascending by id.
    pub(crate) cpus: Vec<Cpu>,
    /// Physical cores, ordered by lowest CPU id.
    pub cores: Vec<Core>,
    /// L3 domains, ordered by lowest CPU id.
    pub l3_domains: Vec<L3Domain>,
    /// NUMA nodes, ascending by id.
    pub numa_nodes: Vec<NumaNode>,
    /// `cpu id -> index into cpus`.
    #[serde(skip)]
    by_id: Vec<Option<usize>>,
}

fn read(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_opt(path: &Path) -> Result<Option<String>, TopologyError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TopologyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn cpulist(path: &Path, text: &str) -> Result<CpuSet, TopologyError> {
    CpuSet::parse(text).map_err(|source| TopologyError::CpuList {
        path: path.to_path_buf(),
        source,
    })
}

fn read_cpulist(path: &Path) -> Result<CpuSet, TopologyError> {
    cpulist(path, &read(path)?)
}

fn read_u32(path: &Path) -> Result<Option<u32>, TopologyError> {
    let Some(text) = read_opt(path)? else {
        return Ok(None);
    };
    let t = text.trim();
    // physical_package_id and core_id read -1 on some platforms.
    if t == "-1" {
        return Ok(Some(0));
    }
    t.parse().map(Some).map_err(|_| TopologyError::Value {
        path: path.to_path_buf(),
        value: t.to_string(),
        reason: "not an unsigned integer",
    })
}

/// Per-CPU facts as read, before grouping.
struct RawCpu {
    id: u32,
    siblings: CpuSet,
    package: u32,
    l3: Option<CpuSet>,
}

impl Topology {
    /// Reads the topology from `sysfs` (the directory that holds
    /// `devices/system/cpu`, normally `/sys`).
    pub fn from_sysfs(sysfs: &Path) -> Result<Self, TopologyError> {
        let cpu_dir = sysfs.join("devices/system/cpu");
        let online = read_cpulist(&cpu_dir.join("online"))?;
        if online.is_empty() {
            return Err(TopologyError::NoCpus(sysfs.to_path_buf()));
        }
        let isolated = match read_opt(&cpu_dir.join("isolated"))? {
            Some(t) => cpulist(&cpu_dir.join("isolated"), &t)?,
            None => CpuSet::new(),
        };

        let mut raw = Vec::with_capacity(online.len());
        for id in online.iter() {
            let dir = cpu_dir.join(format!("cpu{id}"));
            let topo = dir.join("topology");
            let siblings = match read_opt(&topo.join("thread_siblings_list"))? {
                Some(t) => cpulist(&topo.join("thread_siblings_list"), &t)?,
                None => [id].into_iter().collect(),
            };
            let package = read_u32(&topo.join("physical_package_id"))?.unwrap_or(0);
            raw.push(RawCpu {
                id,
                siblings: siblings
                    .intersection(&online)
                    .union(&[id].into_iter().collect()),
                package,
                l3: read_l3(&dir.join("cache"))?,
            });
        }
        let numa = read_numa(&sysfs.join("devices/system/node"), &online)?;
        Ok(Self::build(online, isolated, raw, &numa))
    }

    fn build(
        online: CpuSet,
        isolated: CpuSet,
        raw: Vec<RawCpu>,
        numa_of: &BTreeMap<u32, u32>,
    ) -> Self {
        let node = |cpu: u32| numa_of.get(&cpu).copied().unwrap_or(0);
        // Group into L3 domains keyed by their (online) CPU set; CPUs with no
        // L3 entry are grouped by package.
        let mut package_cpus: BTreeMap<u32, CpuSet> = BTreeMap::new();
        for r in &raw {
            if r.l3.is_none() {
                package_cpus.entry(r.package).or_default().insert(r.id);
            }
        }
        let mut domain_sets: BTreeMap<u32, (CpuSet, bool)> = BTreeMap::new();
        for r in &raw {
            let (set, from_cache) = match &r.l3 {
                Some(s) => (
                    s.intersection(&online).union(&[r.id].into_iter().collect()),
                    true,
                ),
                None => (package_cpus[&r.package].clone(), false),
            };
            let first = set.first().unwrap_or(r.id);
            domain_sets.entry(first).or_insert((set, from_cache));
        }
        // A CPU belongs to the domain with the lowest first CPU that holds it,
        // so overlapping reports (never seen on real hosts) still partition.
        let mut l3_of = BTreeMap::new();
        let mut l3_domains: Vec<L3Domain> = Vec::new();
        for (first, (set, from_cache)) in &domain_sets {
            let own: CpuSet = set.iter().filter(|c| !l3_of.contains_key(c)).collect();
            if own.is_empty() {
                continue;
            }
            let index = l3_domains.len();
            for c in own.iter() {
                l3_of.insert(c, index);
            }
            let package = raw
                .iter()
                .find(|r| r.id == own.first().unwrap_or(*first))
                .map_or(0, |r| r.package);
            l3_domains.push(L3Domain {
                index,
                numa: node(own.first().unwrap_or(*first)),
                package,
                cpus: own,
                cores: Vec::new(),
                from_cache_info: *from_cache,
            });
        }

        // Physical cores: siblings that share one L3 domain.
        let mut cores: Vec<Core> = Vec::new();
        let mut core_of: BTreeMap<u32, usize> = BTreeMap::new();
        for r in &raw {
            if core_of.contains_key(&r.id) {
                continue;
            }
            let l3 = l3_of[&r.id];
            let cpus: CpuSet = r
                .siblings
                .iter()
                .filter(|c| l3_of.get(c) == Some(&l3) && !core_of.contains_key(c))
                .collect();
            let index = cores.len();
            for c in cpus.iter() {
                core_of.insert(c, index);
            }
            l3_domains[l3].cores.push(index);
            cores.push(Core {
                index,
                cpus,
                l3,
                numa: node(r.id),
                package: r.package,
            });
        }

        let mut nodes: BTreeMap<u32, NumaNode> = BTreeMap::new();
        for r in &raw {
            let id = node(r.id);
            nodes
                .entry(id)
                .or_insert_with(|| NumaNode {
                    id,
                    cpus: CpuSet::new(),
                    l3_domains: Vec::new(),
                })
                .cpus
                .insert(r.id);
        }
        for d in &l3_domains {
            if let Some(n) = nodes.get_mut(&d.numa) {
                n.l3_domains.push(d.index);
            }
        }

        let max = online.iter().last().unwrap_or(0) as usize;
        let mut by_id = vec![None; max + 1];
        let cpus: Vec<Cpu> = raw
            .iter()
            .enumerate()
            .map(|(i, r)| {
                by_id[r.id as usize] = Some(i);
                Cpu {
                    id: r.id,
                    core: core_of[&r.id],
                    l3: l3_of[&r.id],
                    numa: node(r.id),
                    package: r.package,
                }
            })
            .collect();
        Self {
            online,
            isolated,
            cpus,
            cores,
            l3_domains,
            numa_nodes: nodes.into_values().collect(),
            by_id,
        }
    }

    /// A synthetic topology: `packages` x `l3_per_package` L3 domains of
    /// `cores_per_l3` cores with `threads` SMT threads each, numbered the way
    /// Linux numbers AMD EPYC (all first threads, then all second threads),
    /// with `nodes_per_package` NUMA nodes per package. Used by tests and the
    /// simulator; fixtures on disk come from the same layout.
    pub fn synthetic(
        packages: u32,
        l3_per_package: u32,
        cores_per_l3: u32,
        threads: u32,
        nodes_per_package: u32,
    ) -> Self {
        let cores_total = packages * l3_per_package * cores_per_l3;
        let online = CpuSet::range(0, cores_total * threads - 1);
        let mut raw = Vec::new();
        let mut numa = BTreeMap::new();
        let l3_per_node = (l3_per_package / nodes_per_package.max(1)).max(1);
        for t in 0..threads {
            for core in 0..cores_total {
                let id = t * cores_total + core;
                let l3 = core / cores_per_l3;
                let package = l3 / l3_per_package;
                let node = package * nodes_per_package
                    + ((l3 % l3_per_package) / l3_per_node).min(nodes_per_package - 1);
                let siblings = (0..threads).map(|s| s * cores_total + core).collect();
                let l3_set = (0..threads)
                    .flat_map(|s| {
                        (l3 * cores_per_l3..(l3 + 1) * cores_per_l3)
                            .map(move |c| s * cores_total + c)
                    })
                    .collect();
                numa.insert(id, node);
                raw.push(RawCpu {
                    id,
                    siblings,
                    package,
                    l3: Some(l3_set),
                });
            }
        }
        raw.sort_by_key(|r| r.id);
        Self::build(online, CpuSet::new(), raw, &numa)
    }

    /// This topology with `offline` CPUs taken offline, `isolated` as the
    /// isolated set, and, when `cache_info` is false, no L3 entries (domains
    /// fall back to packages). Reproduces what sysfs shows for such a host,
    /// so named topologies can stand for fixtures with offline CPUs.
    pub(crate) fn with_changes(
        &self,
        offline: &CpuSet,
        isolated: &CpuSet,
        cache_info: bool,
    ) -> Self {
        let online = self.online.difference(offline);
        let numa: BTreeMap<u32, u32> = self
            .cpus
            .iter()
            .filter(|c| online.contains(c.id))
            .map(|c| (c.id, c.numa))
            .collect();
        let raw = self
            .cpus
            .iter()
            .filter(|c| online.contains(c.id))
            .map(|c| RawCpu {
                id: c.id,
                siblings: self.cores[c.core].cpus.intersection(&online),
                package: c.package,
                l3: cache_info.then(|| self.l3_domains[c.l3].cpus.intersection(&online)),
            })
            .collect();
        Self::build(online, isolated.clone(), raw, &numa)
    }

    /// The CPU with this id, if online.
    pub fn cpu(&self, id: u32) -> Option<&Cpu> {
        self.by_id
            .get(id as usize)
            .copied()
            .flatten()
            .map(|i| &self.cpus[i])
    }

    /// Number of SMT threads of the widest core.
    pub(crate) fn threads_per_core(&self) -> usize {
        self.cores.iter().map(|c| c.cpus.len()).max().unwrap_or(1)
    }

    /// L3 domains (indices) that hold any CPU of `set`.
    pub(crate) fn l3_domains_of(&self, set: &CpuSet) -> Vec<usize> {
        let mut out: Vec<usize> = set
            .iter()
            .filter_map(|c| self.cpu(c))
            .map(|c| c.l3)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// All CPUs of the given L3 domains.
    pub(crate) fn cpus_of_l3(&self, domains: &[usize]) -> CpuSet {
        domains
            .iter()
            .filter_map(|&d| self.l3_domains.get(d))
            .fold(CpuSet::new(), |acc, d| acc.union(&d.cpus))
    }
}

fn read_l3(cache_dir: &Path) -> Result<Option<CpuSet>, TopologyError> {
    let entries = match fs::read_dir(cache_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TopologyError::Read {
                path: cache_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("index"))
        })
        .collect();
    names.sort();
    for dir in names {
        if read_u32(&dir.join("level"))? != Some(3) {
            continue;
        }
        if let Some(t) = read_opt(&dir.join("type"))? {
            if t.trim() == "Instruction" {
                continue;
            }
        }
        return Ok(Some(read_cpulist(&dir.join("shared_cpu_list"))?));
    }
    Ok(None)
}

fn read_numa(node_dir: &Path, online: &CpuSet) -> Result<BTreeMap<u32, u32>, TopologyError> {
    let mut map = BTreeMap::new();
    let entries = match fs::read_dir(node_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(map),
        Err(source) => {
            return Err(TopologyError::Read {
                path: node_dir.to_path_buf(),
                source,
            })
        }
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(num) = name.to_str().and_then(|n| n.strip_prefix("node")) else {
            continue;
        };
        let Ok(id) = num.parse::<u32>() else {
            continue;
        };
        let list = e.path().join("cpulist");
        for c in read_cpulist(&list)?.intersection(online).iter() {
            map.insert(c, id);
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_milan() {
        let t = Topology::synthetic(1, 8, 8, 2, 1);
        assert_eq!(t.online.len(), 128);
        assert_eq!(t.l3_domains.len(), 8);
        assert_eq!(t.cores.len(), 64);
        assert_eq!(t.l3_domains[0].cpus.to_string(), "0-7,64-71");
        assert_eq!(t.cores[0].cpus.to_string(), "0,64");
        assert_eq!(t.threads_per_core(), 2);
        assert_eq!(t.cpu(65).map(|c| c.core), Some(1));
    }

    #[test]
    fn synthetic_genoa_nps4() {
        let t = Topology::synthetic(2, 12, 8, 2, 4);
        assert_eq!(t.online.len(), 384);
        assert_eq!(t.l3_domains.len(), 24);
        assert_eq!(t.numa_nodes.len(), 8);
        assert!(t.numa_nodes.iter().all(|n| n.l3_domains.len() == 3));
    }
}
