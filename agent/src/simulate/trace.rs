//! Traces: VM arrivals and departures, reclaims and vCPU migrations, in
//! JSON or YAML.
//!
//! ```yaml
//! name: example
//! seed: 7
//! duration: 600
//! events:
//!   - {event: arrive, at: 0, vm: vm-1, vcpus: 8, class: sev, dedicated: true,
//!      reclaimRate: 0.5, migrationRate: 1}
//!   - {event: reclaim, at: 10.5, vm: vm-1}
//!   - {event: migrate, at: 11, vm: vm-1}
//!   - {event: depart, at: 300, vm: vm-1}
//! ```
//!
//! `reclaimRate` and `migrationRate` are per-VM Poisson rates (events per
//! second) expanded by the simulator with the trace's seed; explicit
//! `reclaim` and `migrate` events come on top.

use std::collections::BTreeSet;
use std::path::Path;

use super::SimError;
use crate::types::{ConfidentialClass, VmId};

/// A whole trace.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trace {
    /// The trace's name, shown in reports.
    pub(crate) name: String,
    /// What the trace models.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) description: String,
    /// Seed of the scheduler model and of the rate expansion.
    #[serde(default)]
    pub(crate) seed: u64,
    /// End of the trace in seconds; defaults to the last event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) duration: Option<f64>,
    /// The events, in time order.
    pub events: Vec<Event>,
}

/// One trace event. `at` is in seconds from the start.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawEvent", into = "RawEvent")]
pub enum Event {
    /// A VM arrives and asks for a placement.
    Arrive {
        /// Seconds from the start.
        at: f64,
        /// The VM.
        vm: VmId,
        /// Its vCPUs.
        vcpus: u32,
        /// Its confidential class.
        class: ConfidentialClass,
        /// Whether it asks for dedicated CPUs.
        dedicated: bool,
        /// Reclaims per second (Poisson), expanded by the simulator.
        reclaim_rate: f64,
        /// vCPU migrations per second (Poisson), expanded by the simulator.
        migration_rate: f64,
    },
    /// The VM leaves and its CPUs are freed.
    Depart {
        /// Seconds from the start.
        at: f64,
        /// The VM.
        vm: VmId,
    },
    /// KVM reclaims memory of the VM, which makes an SEV VM flush caches.
    Reclaim {
        /// Seconds from the start.
        at: f64,
        /// The VM.
        vm: VmId,
    },
    /// A vCPU of the VM moves to another CPU of its set.
    Migrate {
        /// Seconds from the start.
        at: f64,
        /// The VM.
        vm: VmId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
enum Kind {
    Arrive,
    Depart,
    Reclaim,
    Migrate,
}

/// The event as written: a flat record, so that type errors are reported
/// at the offending value (an internally tagged enum would buffer the
/// record and report them at its end).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEvent {
    event: Kind,
    at: f64,
    vm: VmId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    class: Option<ConfidentialClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dedicated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reclaim_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    migration_rate: Option<f64>,
}

/// Why a record is not a valid event: the field and the reason.
type FieldError = (&'static str, String);

impl TryFrom<RawEvent> for Event {
    type Error = String;
    fn try_from(r: RawEvent) -> Result<Self, String> {
        Self::from_raw(r).map_err(|(field, reason)| format!("{field}: {reason}"))
    }
}

impl Event {
    fn from_raw(r: RawEvent) -> Result<Self, FieldError> {
        let (at, vm) = (r.at, r.vm);
        if r.event != Kind::Arrive {
            let extra = [
                ("vcpus", r.vcpus.is_some()),
                ("class", r.class.is_some()),
                ("dedicated", r.dedicated.is_some()),
                ("reclaimRate", r.reclaim_rate.is_some()),
                ("migrationRate", r.migration_rate.is_some()),
            ];
            if let Some((name, _)) = extra.iter().find(|x| x.1) {
                return Err((name, format!("belongs to arrive events only (vm {vm})")));
            }
        }
        Ok(match r.event {
            Kind::Arrive => Self::Arrive {
                at,
                vcpus: r
                    .vcpus
                    .ok_or_else(|| ("vcpus", format!("missing in the arrive event of {vm}")))?,
                class: r
                    .class
                    .ok_or_else(|| ("class", format!("missing in the arrive event of {vm}")))?,
                vm,
                dedicated: r.dedicated.unwrap_or(false),
                reclaim_rate: r.reclaim_rate.unwrap_or(0.0),
                migration_rate: r.migration_rate.unwrap_or(0.0),
            },
            Kind::Depart => Self::Depart { at, vm },
            Kind::Reclaim => Self::Reclaim { at, vm },
            Kind::Migrate => Self::Migrate { at, vm },
        })
    }
}

impl From<Event> for RawEvent {
    fn from(e: Event) -> Self {
        let plain = |event, at, vm| RawEvent {
            event,
            at,
            vm,
            vcpus: None,
            class: None,
            dedicated: None,
            reclaim_rate: None,
            migration_rate: None,
        };
        match e {
            Event::Arrive {
                at,
                vm,
                vcpus,
                class,
                dedicated,
                reclaim_rate,
                migration_rate,
            } => RawEvent {
                event: Kind::Arrive,
                at,
                vm,
                vcpus: Some(vcpus),
                class: Some(class),
                dedicated: Some(dedicated),
                reclaim_rate: (reclaim_rate != 0.0).then_some(reclaim_rate),
                migration_rate: (migration_rate != 0.0).then_some(migration_rate),
            },
            Event::Depart { at, vm } => plain(Kind::Depart, at, vm),
            Event::Reclaim { at, vm } => plain(Kind::Reclaim, at, vm),
            Event::Migrate { at, vm } => plain(Kind::Migrate, at, vm),
        }
    }
}

impl Event {
    /// Seconds from the start of the trace.
    pub(crate) fn at(&self) -> f64 {
        match self {
            Self::Arrive { at, .. }
            | Self::Depart { at, .. }
            | Self::Reclaim { at, .. }
            | Self::Migrate { at, .. } => *at,
        }
    }

    /// The VM the event is about.
    pub(crate) fn vm(&self) -> &VmId {
        match self {
            Self::Arrive { vm, .. }
            | Self::Depart { vm, .. }
            | Self::Reclaim { vm, .. }
            | Self::Migrate { vm, .. } => vm,
        }
    }
}

/// The trace as written, before events are checked one by one.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTrace {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    duration: Option<f64>,
    events: Vec<RawEvent>,
}

impl RawTrace {
    fn into_trace(self, origin: &str) -> Result<Trace, SimError> {
        let events = self
            .events
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                Event::from_raw(r).map_err(|(field, reason)| SimError::Invalid {
                    origin: origin.to_string(),
                    field: format!("events[{i}].{field}"),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Trace {
            name: self.name,
            description: self.description,
            seed: self.seed,
            duration: self.duration,
            events,
        })
    }
}

/// Trace file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Yaml,
}

impl Format {
    /// By extension (`.json`, `.yaml`, `.yml`), else by content: a document
    /// that starts with `{` is JSON.
    pub(crate) fn detect(path: &Path, text: &str) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::Json,
            Some("yaml" | "yml") => Self::Yaml,
            _ if text.trim_start().starts_with('{') => Self::Json,
            _ => Self::Yaml,
        }
    }
}

impl Trace {
    /// Reads and checks a trace file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(
            &text,
            Format::detect(path, &text),
            &path.display().to_string(),
        )
    }

    /// Parses and checks a trace; `origin` names it in errors.
    pub(crate) fn parse(text: &str, format: Format, origin: &str) -> Result<Self, SimError> {
        let raw: RawTrace = match format {
            Format::Json => serde_json::from_str(text).map_err(|e| SimError::Parse {
                origin: origin.to_string(),
                line: Some(e.line()),
                column: Some(e.column()),
                message: e.to_string(),
            })?,
            Format::Yaml => yaml_serde::from_str(text).map_err(|e| {
                let loc = e.location();
                SimError::Parse {
                    origin: origin.to_string(),
                    line: loc.as_ref().map(|l| l.line()),
                    column: loc.as_ref().map(|l| l.column()),
                    message: e.to_string(),
                }
            })?,
        };
        let trace = raw.into_trace(origin)?;
        trace.check(origin)?;
        Ok(trace)
    }

    /// Checks what the type system cannot: times, sizes, rates, and that
    /// each VM arrives once before its other events.
    pub(crate) fn check(&self, origin: &str) -> Result<(), SimError> {
        let bad = |i: usize, field: &str, reason: String| SimError::Invalid {
            origin: origin.to_string(),
            field: format!("events[{i}].{field}"),
            reason,
        };
        if let Some(d) = self.duration {
            if !(d.is_finite() && d >= 0.0) {
                return Err(SimError::Invalid {
                    origin: origin.to_string(),
                    field: "duration".into(),
                    reason: format!("{d} is not a finite, non-negative number of seconds"),
                });
            }
        }
        let mut order: Vec<usize> = (0..self.events.len()).collect();
        order.sort_by(|&a, &b| {
            self.events[a]
                .at()
                .total_cmp(&self.events[b].at())
                .then(a.cmp(&b))
        });
        let mut arrived: BTreeSet<&VmId> = BTreeSet::new();
        let mut departed: BTreeSet<&VmId> = BTreeSet::new();
        for i in order {
            let e = &self.events[i];
            let at = e.at();
            if !(at.is_finite() && at >= 0.0) {
                return Err(bad(
                    i,
                    "at",
                    format!("{at} is not a finite, non-negative time"),
                ));
            }
            let vm = e.vm();
            match e {
                Event::Arrive {
                    vcpus,
                    reclaim_rate,
                    migration_rate,
                    ..
                } => {
                    if *vcpus == 0 {
                        return Err(bad(i, "vcpus", "must be at least 1".into()));
                    }
                    for (name, r) in [
                        ("reclaimRate", reclaim_rate),
                        ("migrationRate", migration_rate),
                    ] {
                        if !(r.is_finite() && *r >= 0.0) {
                            return Err(bad(
                                i,
                                name,
                                format!("{r} is not a finite, non-negative rate"),
                            ));
                        }
                    }
                    if !arrived.insert(vm) {
                        return Err(bad(i, "vm", format!("{vm} arrives twice")));
                    }
                }
                _ => {
                    if !arrived.contains(vm) {
                        return Err(bad(i, "vm", format!("{vm} has no earlier arrive event")));
                    }
                    if departed.contains(vm) {
                        return Err(bad(i, "vm", format!("{vm} already departed")));
                    }
                    if matches!(e, Event::Depart { .. }) {
                        departed.insert(vm);
                    }
                }
            }
        }
        Ok(())
    }

    /// The end of the trace: `duration`, or the last event.
    pub(crate) fn end(&self) -> f64 {
        self.duration
            .unwrap_or_else(|| self.events.iter().map(Event::at).fold(0.0, f64::max))
    }

    /// The trace as JSON text, in the trace file format.
    pub(crate) fn to_json(&self) -> String {
        let mut out = String::from("{\n");
        out += &format!("  \"name\": {},\n", json_str(&self.name));
        if !self.description.is_empty() {
            out += &format!("  \"description\": {},\n", json_str(&self.description));
        }
        out += &format!("  \"seed\": {},\n", self.seed);
        if let Some(d) = self.duration {
            out += &format!("  \"duration\": {d},\n");
        }
        out += "  \"events\": [\n";
        let lines: Vec<String> = self
            .events
            .iter()
            .map(|e| format!("    {}", serde_json::to_string(e).unwrap_or_default()))
            .collect();
        out += &lines.join(",\n");
        out += "\n  ]\n}\n";
        out
    }

    /// YAML with one flow mapping per event, so each event is one line.
    pub(crate) fn to_yaml(&self) -> String {
        let mut out = format!("name: {}\n", json_str(&self.name));
        if !self.description.is_empty() {
            out += &format!("description: {}\n", json_str(&self.description));
        }
        out += &format!("seed: {}\n", self.seed);
        if let Some(d) = self.duration {
            out += &format!("duration: {d}\n");
        }
        out += "events:\n";
        for e in &self.events {
            out += &format!("  - {}\n", serde_json::to_string(e).unwrap_or_default());
        }
        out
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}
