//! Which live VM each intent names on a pass, by the one matcher
//! ([`crate::state::selector`]). An intent whose selector names several
//! VMs, a cgroup above VMs' own cgroups, or a VM another intent already
//! holds is matched to none and reported; it is neither pinned nor taken
//! for exited.

use std::collections::BTreeMap;

use crate::discovery::DiscoveredVm;
use crate::state::selector::{self, Resolution};
use crate::state::IntentRecord;
use crate::types::VmId;

/// The outcome of matching every intent against one scan.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct IntentMatches {
    /// The pid each matched intent names.
    pub(crate) matched: BTreeMap<VmId, u32>,
    /// Why an intent is matched to no VM although its selector names some.
    pub(crate) problems: BTreeMap<VmId, String>,
}

impl IntentMatches {
    /// One line naming every problem, for the condition; `None` if none.
    pub(crate) fn summary(&self) -> Option<String> {
        if self.problems.is_empty() {
            return None;
        }
        let each: Vec<String> = self
            .problems
            .iter()
            .map(|(id, p)| format!("VM {id}: {p}"))
            .collect();
        Some(format!(
            "{} intent(s) name no single VM and are not applied: {}",
            self.problems.len(),
            each.join("; ")
        ))
    }
}

/// Matches `intents` (in checkpoint order, by vm_id) to the VMs of `scan`.
/// A VM goes to the first intent that names it alone.
pub(crate) fn match_intents(
    intents: &[std::sync::Arc<IntentRecord>],
    scan: &BTreeMap<u32, DiscoveredVm>,
) -> IntentMatches {
    let mut out = IntentMatches::default();
    let mut holder: BTreeMap<u32, &VmId> = BTreeMap::new();
    let index = selector::ScanIndex::new(scan);
    for intent in intents {
        let resolution = index.resolve(&intent.selector);
        match resolution {
            Resolution::None => {}
            Resolution::One(vm) => match holder.get(&vm.pid) {
                Some(other) => {
                    out.problems.insert(
                        intent.vm_id.clone(),
                        format!(
                            "its selector names {}, which is VM {other}",
                            selector::describe(vm)
                        ),
                    );
                }
                None => {
                    holder.insert(vm.pid, &intent.vm_id);
                    out.matched.insert(intent.vm_id.clone(), vm.pid);
                }
            },
            other => {
                if let Some(p) = other.problem(&intent.selector) {
                    out.problems.insert(intent.vm_id.clone(), p);
                }
            }
        }
    }
    out
}
