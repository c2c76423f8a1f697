//! Conditions: what keeps the agent from doing its whole job right now,
//! reported in GetHost, in `sevplace_condition{condition}` and in the log
//! (once when raised or changed, once when cleared). Each clears itself
//! when the operation it is about succeeds again.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// The kinds of condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum ConditionKind {
    /// The intent checkpoint cannot be written (disk full, read-only,
    /// permissions): PlaceVm and ReleaseVm answer UNAVAILABLE and change
    /// nothing; releases of exited VMs wait for the next pass.
    CheckpointWriteFailing,
    /// The procfs scan fails as a whole: drift and exits go unseen.
    HostScanFailing,
    /// Placements of some VMs cannot be applied; retried with backoff.
    PinsFailing,
    /// The sevflush module is loaded but unusable (other ABI, unreadable
    /// files): no flush figures, no labels.
    ModuleUnusable,
    /// Some intents' selectors name several live VMs, or a cgroup above
    /// VMs' own cgroups, or can never match: those intents are not applied
    /// to any VM until the selector names exactly one.
    SelectorsAmbiguous,
    /// Some intents' placements do not fit the current topology and no
    /// other placement does: those VMs are unplaceable, kept, not pinned.
    PlacementsUnplaceable,
    /// The fleet reporter cannot make OpenStack Placement hold this host's
    /// providers and allocations (unreachable, refusing): the fleet's view
    /// of the host is stale; retried until it succeeds.
    FleetSyncFailing,
}

impl ConditionKind {
    pub(crate) const ALL: [ConditionKind; 7] = [
        Self::CheckpointWriteFailing,
        Self::HostScanFailing,
        Self::PinsFailing,
        Self::ModuleUnusable,
        Self::SelectorsAmbiguous,
        Self::PlacementsUnplaceable,
        Self::FleetSyncFailing,
    ];

    /// The metric label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::CheckpointWriteFailing => "checkpoint_write_failing",
            Self::HostScanFailing => "host_scan_failing",
            Self::PinsFailing => "pins_failing",
            Self::ModuleUnusable => "module_unusable",
            Self::SelectorsAmbiguous => "selectors_ambiguous",
            Self::PlacementsUnplaceable => "placements_unplaceable",
            Self::FleetSyncFailing => "fleet_sync_failing",
        }
    }
}

/// One raised condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Condition {
    pub(crate) kind: ConditionKind,
    pub(crate) message: String,
    /// When it was raised (not when the message last changed).
    pub(crate) since: SystemTime,
}

/// What a `raise` or `clear` changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Raised,
    MessageChanged,
    Cleared,
    None,
}

/// The raised conditions.
#[derive(Debug, Clone, Default)]
pub(crate) struct Conditions {
    raised: BTreeMap<ConditionKind, Condition>,
}

impl Conditions {
    /// Raises `kind` with `message`, or updates the message of a raised
    /// one (its `since` stays).
    pub(crate) fn raise(
        &mut self,
        kind: ConditionKind,
        message: String,
        now: SystemTime,
    ) -> Change {
        match self.raised.get_mut(&kind) {
            Some(c) if c.message == message => Change::None,
            Some(c) => {
                c.message = message;
                Change::MessageChanged
            }
            None => {
                self.raised.insert(
                    kind,
                    Condition {
                        kind,
                        message,
                        since: now,
                    },
                );
                Change::Raised
            }
        }
    }

    /// Clears `kind`.
    pub(crate) fn clear(&mut self, kind: ConditionKind) -> Change {
        match self.raised.remove(&kind) {
            Some(_) => Change::Cleared,
            None => Change::None,
        }
    }

    pub(crate) fn is_raised(&self, kind: ConditionKind) -> bool {
        self.raised.contains_key(&kind)
    }

    pub(crate) fn get(&self, kind: ConditionKind) -> Option<&Condition> {
        self.raised.get(&kind)
    }

    /// Every raised condition, in kind order.
    pub(crate) fn list(&self) -> Vec<Condition> {
        self.raised.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn raise_update_clear() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let t1 = t0 + Duration::from_secs(5);
        let mut c = Conditions::default();
        let k = ConditionKind::CheckpointWriteFailing;
        let table = [
            (c.raise(k, "disk full".into(), t0), Change::Raised),
            (c.raise(k, "disk full".into(), t1), Change::None),
            (c.raise(k, "read-only".into(), t1), Change::MessageChanged),
        ];
        for (got, want) in table {
            assert_eq!(got, want);
        }
        let raised = c.get(k).cloned().unwrap();
        assert_eq!(raised.message, "read-only");
        assert_eq!(raised.since, t0, "since stays at the first raise");
        assert_eq!(c.list().len(), 1);
        assert_eq!(c.clear(k), Change::Cleared);
        assert_eq!(c.clear(k), Change::None);
        assert!(!c.is_raised(k));
    }

    #[test]
    fn label_values_are_distinct() {
        let mut names: Vec<_> = ConditionKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ConditionKind::ALL.len());
    }
}
