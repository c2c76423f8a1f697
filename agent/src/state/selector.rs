//! The one matcher between a [`VmSelector`] and the VMs discovered on the
//! host. PlaceVm and every reconcile pass (an intent re-matched to a VM
//! restarted under a new pid) resolve selectors here, so both see the same
//! VM or the same error.
//!
//! Rules:
//! - `Process`: the same pid, and the same start time when one was
//!   recorded (a reused pid names another process).
//! - `LibvirtDomain`: the VMs whose libvirt domain has the name; only when
//!   no live VM has that libvirt domain, the VMs without a libvirt domain
//!   whose QEMU guest name (`-name guest=`) is the name.
//! - `CgroupPath`: the VMs whose own cgroup is the path or contains it. A
//!   VM's own cgroup is its libvirt machine cgroup, else the cgroups of its
//!   main thread (the root cgroup is nobody's own). A path above a VM's own
//!   cgroup (`/machine.slice`) names no VM: it is reported as
//!   [`Resolution::Ancestor`] with the VMs below it.
//!
//! More than one match is [`Resolution::Ambiguous`]: nothing is pinned and
//! the caller is told which VMs matched.

use std::collections::{BTreeMap, HashMap};

use crate::discovery::DiscoveredVm;

use super::VmSelector;

/// Why a selector can never name a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub(crate) struct InvalidSelector {
    /// The request field, as the API names it.
    pub(crate) field: &'static str,
    pub(crate) reason: String,
}

/// Checks a selector on its own: an empty or root cgroup path would name
/// every VM, an empty domain name none.
pub(crate) fn validate(selector: &VmSelector) -> Result<(), InvalidSelector> {
    match selector {
        VmSelector::Process { pid: 0, .. } => Err(InvalidSelector {
            field: "selector.pid",
            reason: "must not be 0".into(),
        }),
        VmSelector::Process { .. } => Ok(()),
        VmSelector::LibvirtDomain { name } if name.is_empty() => Err(InvalidSelector {
            field: "selector.libvirt_domain",
            reason: "must not be empty".into(),
        }),
        VmSelector::LibvirtDomain { .. } => Ok(()),
        VmSelector::CgroupPath { path } => {
            if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                return Err(InvalidSelector {
                    field: "selector.cgroup_path",
                    reason: "must be absolute, without '..'".into(),
                });
            }
            if normalized(path).is_empty() {
                return Err(InvalidSelector {
                    field: "selector.cgroup_path",
                    reason: "the root cgroup holds every VM; name a VM's own cgroup".into(),
                });
            }
            Ok(())
        }
    }
}

/// What a selector names among the live VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolution<'a> {
    /// No live VM: the intent waits for one.
    None,
    /// Exactly this VM.
    One(&'a DiscoveredVm),
    /// Several VMs match; none is chosen.
    Ambiguous(Vec<&'a DiscoveredVm>),
    /// A cgroup path above the own cgroups of these VMs; none is chosen.
    Ancestor(Vec<&'a DiscoveredVm>),
    /// The selector can never match (a restored checkpoint may hold one
    /// written by an older sevplaced).
    Invalid(InvalidSelector),
}

impl Resolution<'_> {
    /// A message naming the matched VMs, for errors, conditions and logs;
    /// `None` for `None` and `One`.
    pub(crate) fn problem(&self, selector: &VmSelector) -> Option<String> {
        let names = |vms: &[&DiscoveredVm]| {
            vms.iter()
                .map(|v| describe(v))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Self::None | Self::One(_) => None,
            Self::Ambiguous(vms) => Some(format!(
                "selector {} matches {} VMs: {}; use a selector that names one VM (pid or its own cgroup)",
                describe_selector(selector),
                vms.len(),
                names(vms)
            )),
            Self::Ancestor(vms) => Some(format!(
                "selector {} names a cgroup above the own cgroups of {} VM(s): {}; name one VM's own cgroup",
                describe_selector(selector),
                vms.len(),
                names(vms)
            )),
            Self::Invalid(e) => Some(format!(
                "selector {} can never match: {e}",
                describe_selector(selector)
            )),
        }
    }
}

/// `pid 123 (libvirt domain web, cgroup /machine.slice/...)`.
pub(crate) fn describe(vm: &DiscoveredVm) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &vm.libvirt_domain {
        parts.push(format!("libvirt domain {d}"));
    } else if let Some(g) = &vm.guest_name {
        parts.push(format!("guest name {g}"));
    }
    if let Some(c) = own_cgroups(vm).first() {
        parts.push(format!("cgroup {c}"));
    }
    if parts.is_empty() {
        format!("pid {}", vm.pid)
    } else {
        format!("pid {} ({})", vm.pid, parts.join(", "))
    }
}

fn describe_selector(selector: &VmSelector) -> String {
    match selector {
        VmSelector::Process { pid, .. } => format!("pid {pid}"),
        VmSelector::LibvirtDomain { name } => format!("libvirt domain {name:?}"),
        VmSelector::CgroupPath { path } => format!("cgroup path {path:?}"),
    }
}

/// A cgroup path without trailing slashes; the root is `""`.
fn normalized(path: &str) -> &str {
    path.trim_end_matches('/')
}

/// `path` is `base` or lies below it (both normalized, `base` not root).
fn within(path: &str, base: &str) -> bool {
    path == base || (path.starts_with(base) && path[base.len()..].starts_with('/'))
}

/// The VM's own cgroups: its libvirt machine cgroup when it has one, else
/// the non-root cgroups of its main thread.
fn own_cgroups(vm: &DiscoveredVm) -> Vec<&str> {
    if let Some(lv) = &vm.cgroup.libvirt {
        let p = normalized(&lv.machine_path);
        return if p.is_empty() { Vec::new() } else { vec![p] };
    }
    let mut out: Vec<&str> = [&vm.cgroup.v1_cpuset, &vm.cgroup.unified]
        .into_iter()
        .flatten()
        .map(|c| normalized(c))
        .filter(|c| !c.is_empty())
        .collect();
    out.dedup();
    out
}

/// Whether `vm` is named by `selector` (one VM considered alone; use
/// [`resolve`] to choose among several).
fn names(selector: &VmSelector, vm: &DiscoveredVm) -> bool {
    match selector {
        VmSelector::Process { pid, start_time } => {
            vm.pid == *pid && start_time.is_none_or(|s| s == vm.start_time)
        }
        VmSelector::LibvirtDomain { name } => vm.libvirt_domain.as_deref() == Some(name.as_str()),
        VmSelector::CgroupPath { path } => {
            let path = normalized(path);
            !path.is_empty() && own_cgroups(vm).iter().any(|own| within(path, own))
        }
    }
}

/// Resolves `selector` among the live VMs `vms`.
pub(crate) fn resolve<'a, I>(selector: &VmSelector, vms: I) -> Resolution<'a>
where
    I: IntoIterator<Item = &'a DiscoveredVm>,
    I::IntoIter: Clone,
{
    if let Err(e) = validate(selector) {
        return Resolution::Invalid(e);
    }
    let vms = vms.into_iter();
    let mut matched: Vec<&DiscoveredVm> = vms.clone().filter(|v| names(selector, v)).collect();
    match selector {
        VmSelector::LibvirtDomain { name } if matched.is_empty() => {
            matched = vms
                .clone()
                .filter(|v| v.libvirt_domain.is_none() && v.guest_name.as_deref() == Some(name))
                .collect();
        }
        VmSelector::CgroupPath { path } if matched.is_empty() => {
            let path = normalized(path);
            let below: Vec<&DiscoveredVm> = vms
                .clone()
                .filter(|v| {
                    own_cgroups(v)
                        .iter()
                        .any(|own| own != &path && within(own, path))
                })
                .collect();
            if !below.is_empty() {
                return Resolution::Ancestor(sorted(below));
            }
        }
        _ => {}
    }
    match matched.len() {
        0 => Resolution::None,
        1 => Resolution::One(matched[0]),
        _ => Resolution::Ambiguous(sorted(matched)),
    }
}

/// The VMs of one scan indexed by what process and libvirt-domain
/// selectors name, so that resolving every intent of a pass costs the
/// intents plus the VMs, not their product. [`ScanIndex::resolve`] hands
/// [`resolve`] only the VMs a selector can name, so its answer is the
/// answer over the whole scan; a cgroup selector still looks at every VM
/// (a path names VMs below and above it).
#[derive(Debug)]
pub struct ScanIndex<'a> {
    all: &'a BTreeMap<u32, DiscoveredVm>,
    /// VMs by libvirt domain, and VMs without one by guest name.
    by_name: HashMap<&'a str, Vec<&'a DiscoveredVm>>,
}

impl<'a> ScanIndex<'a> {
    /// Indexes the VMs of a scan, keyed by pid.
    pub fn new(all: &'a BTreeMap<u32, DiscoveredVm>) -> Self {
        let mut by_name: HashMap<&'a str, Vec<&'a DiscoveredVm>> = HashMap::new();
        for vm in all.values() {
            let name = match (&vm.libvirt_domain, &vm.guest_name) {
                (Some(domain), _) => domain.as_str(),
                (None, Some(guest)) => guest.as_str(),
                (None, None) => continue,
            };
            by_name.entry(name).or_default().push(vm);
        }
        Self { all, by_name }
    }

    /// What [`resolve`] answers for `selector` over every VM of the scan.
    pub fn resolve(&self, selector: &VmSelector) -> Resolution<'a> {
        match selector {
            VmSelector::Process { pid, .. } => resolve(selector, self.all.get(pid)),
            VmSelector::LibvirtDomain { name } => resolve(
                selector,
                self.by_name
                    .get(name.as_str())
                    .into_iter()
                    .flatten()
                    .copied(),
            ),
            VmSelector::CgroupPath { .. } => resolve(selector, self.all.values()),
        }
    }
}

fn sorted(mut vms: Vec<&DiscoveredVm>) -> Vec<&DiscoveredVm> {
    vms.sort_by_key(|v| v.pid);
    vms.dedup_by_key(|v| v.pid);
    vms
}

#[cfg(test)]
mod tests;
