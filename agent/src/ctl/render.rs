//! Human-readable tables of API messages.

use std::fmt::Write;

use sevplace_proto::v1 as pb;

use crate::cpuset::CpuSet;

/// `repeated uint32` CPU ids as a cpulist; `-` when empty.
pub(crate) fn cpulist(ids: &[u32]) -> String {
    let s = ids.iter().copied().collect::<CpuSet>().to_string();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// A process id; `-` for none (0: a placement whose VM has no process).
pub(crate) fn pid(p: u32) -> String {
    if p == 0 {
        "-".into()
    } else {
        p.to_string()
    }
}

fn enum_name<E: std::fmt::Debug>(v: Result<E, prost::UnknownEnumValue>) -> String {
    match v {
        Ok(e) => format!("{e:?}").to_lowercase(),
        Err(e) => format!("unknown({})", e.0),
    }
}

pub(crate) fn class(c: i32) -> String {
    match pb::ConfidentialClass::try_from(c) {
        Ok(pb::ConfidentialClass::SevEs) => "sev-es".into(),
        Ok(pb::ConfidentialClass::SevSnp) => "sev-snp".into(),
        other => enum_name(other),
    }
}

/// `sevplacectl host`.
pub(crate) fn host(h: &pb::Host) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "host        {}", h.hostname);
    let _ = writeln!(o, "agent       {}", h.agent_version);
    if let Some(t) = &h.topology {
        let _ = writeln!(
            o,
            "cpus        {} online ({}), {} cores, {} threads/core, isolated {}",
            t.online_cpus.len(),
            cpulist(&t.online_cpus),
            t.core_count,
            t.threads_per_core,
            cpulist(&t.isolated_cpus)
        );
        let _ = writeln!(o, "reserved    {}", cpulist(&h.reserved_cpus));
        let _ = writeln!(
            o,
            "numa        {}",
            t.numa_nodes
                .iter()
                .map(|n| format!("node{}={}", n.id, cpulist(&n.cpus)))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let _ = writeln!(o, "l3 domains  {}", t.l3_domains.len());
        let _ = writeln!(
            o,
            "  {:>4}  {:>4}  {:>4}  {:<13}  {:<24}  free",
            "L3", "node", "pkg", "pool", "cpus"
        );
        for d in &t.l3_domains {
            let pool = match pb::Pool::try_from(d.pool) {
                Ok(pb::Pool::Confidential) => "confidential",
                Ok(pb::Pool::General) => "general",
                _ => "-",
            };
            let _ = writeln!(
                o,
                "  {:>4}  {:>4}  {:>4}  {:<13}  {:<24}  {}",
                d.index,
                d.numa_node,
                d.package,
                pool,
                cpulist(&d.cpus),
                cpulist(&d.free_cpus)
            );
        }
    }
    if !h.capacity.is_empty() {
        let _ = writeln!(o, "capacity");
        for c in &h.capacity {
            let fits = c
                .fits
                .iter()
                .map(|f| format!("{}x{}v", f.count, f.vcpus))
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(
                o,
                "  {:<8} free {:>4} cpus, largest VM {:>4} vCPUs, fits {}",
                class(c.confidential_class),
                c.free_cpus,
                c.largest_vm_vcpus,
                fits
            );
        }
    }
    let _ = writeln!(
        o,
        "confidential pool L3 domains  {}",
        cpulist(&h.confidential_pool_l3_domains)
    );
    if let Some(m) = &h.module {
        let state = enum_name(pb::ModuleState::try_from(m.state));
        let _ = write!(o, "sevflush    {state}");
        if m.state == pb::ModuleState::Loaded as i32 {
            let _ = write!(
                o,
                " abi {} mode {} flushes {} (cpus {}) full {} scrubs {}",
                m.abi_version,
                m.mode,
                m.flushes_total,
                m.flushed_cpus_total,
                m.full_flushes_total,
                m.scrubs_total
            );
        } else if !m.message.is_empty() {
            let _ = write!(o, ": {}", m.message);
        }
        let _ = writeln!(o);
    }
    if h.conditions.is_empty() {
        let _ = writeln!(o, "conditions  none");
    }
    for c in &h.conditions {
        let _ = writeln!(
            o,
            "condition   {}: {}",
            pb::ConditionType::try_from(c.r#type).map_or_else(
                |e| format!("unknown({})", e.0),
                |t| t
                    .as_str_name()
                    .trim_start_matches("CONDITION_TYPE_")
                    .to_lowercase()
            ),
            c.message
        );
    }
    o
}

/// `sevplacectl vms`.
pub(crate) fn vms(vms: &[pb::Vm]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<24} {:>8} {:<8} {:<10} {:>5} {:<16} {:<16} {:>6}",
        "VM", "PID", "CLASS", "STATE", "VCPUS", "PINNED", "DIRTY", "L3HIT"
    );
    for vm in vms {
        let pinned = vm
            .placement
            .as_ref()
            .map_or("-".into(), |p| cpulist(&p.cpus));
        let (dirty, l3) =
            vm.flush
                .as_ref()
                .filter(|f| f.tracked)
                .map_or(("-".into(), "-".into()), |f| {
                    (
                        cpulist(&f.dirty_cpus),
                        f.blast_radius_l3_domains.to_string(),
                    )
                });
        let _ = writeln!(
            o,
            "{:<24} {:>8} {:<8} {:<10} {:>5} {:<16} {:<16} {:>6}",
            vm.vm_id,
            pid(vm.pid),
            class(vm.confidential_class),
            enum_name(pb::VmState::try_from(vm.state)),
            vm.vcpus,
            pinned,
            dirty,
            l3
        );
    }
    o
}

/// `sevplacectl vm ID`.
pub(crate) fn vm(vm: &pb::Vm) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "vm          {}", vm.vm_id);
    let _ = writeln!(o, "pid         {}", pid(vm.pid));
    if !vm.libvirt_domain.is_empty() {
        let _ = writeln!(o, "domain      {}", vm.libvirt_domain);
    }
    let _ = writeln!(o, "class       {}", class(vm.confidential_class));
    let _ = writeln!(
        o,
        "state       {}",
        enum_name(pb::VmState::try_from(vm.state))
    );
    let _ = writeln!(
        o,
        "vcpus       {}{}",
        vm.vcpus,
        if vm.shared { " (shared)" } else { "" }
    );
    if let Some(p) = &vm.placement {
        let _ = writeln!(o, "cpus        {}", cpulist(&p.cpus));
        let _ = writeln!(o, "l3 domains  {}", cpulist(&p.l3_domains));
        let _ = writeln!(o, "numa nodes  {}", cpulist(&p.numa_nodes));
        if p.shares_confidential_domain {
            let _ = writeln!(
                o,
                "note        shares an L3 domain of the confidential pool"
            );
        }
        for v in &p.vcpus {
            let _ = writeln!(o, "  vcpu {:<3} -> {}", v.index, cpulist(&v.cpus));
        }
    }
    for t in &vm.vcpu_threads {
        let _ = writeln!(
            o,
            "  thread {:<7} vcpu {:<3} allowed {:<16} last cpu {}",
            t.tid,
            t.index,
            cpulist(&t.allowed_cpus),
            t.last_cpu
        );
    }
    if let Some(f) = vm.flush.as_ref().filter(|f| f.tracked) {
        let _ = writeln!(o, "dirty cpus  {}", cpulist(&f.dirty_cpus));
        let _ = writeln!(o, "ran cpus    {}", cpulist(&f.ran_cpus));
        let _ = writeln!(o, "flushes     {} ({} cpus)", f.flushes, f.flushed_cpus);
        let _ = writeln!(
            o,
            "blast       {} L3 domains, {} cpus",
            f.blast_radius_l3_domains, f.blast_radius_cpus
        );
    }
    o
}

/// One line per event for `sevplacectl watch`.
pub(crate) fn event(e: &pb::Event) -> String {
    use pb::event::Kind;
    let what = match &e.kind {
        Some(Kind::Placed(p)) => format!(
            "placed cpus {}",
            p.placement
                .as_ref()
                .map_or("-".into(), |p| cpulist(&p.cpus))
        ),
        Some(Kind::Released(r)) => format!("released cpus {}", cpulist(&r.released_cpus)),
        Some(Kind::Drift(d)) => format!(
            "drift {} tid {} {} -> {}",
            d.reason,
            d.tid,
            cpulist(&d.observed_cpus),
            cpulist(&d.enforced_cpus)
        ),
        Some(Kind::Flush(f)) => format!("flush {} cpus {}", f.kind, f.flushed_cpus),
        Some(Kind::Exited(x)) => format!("exited pid {}", pid(x.pid)),
        Some(Kind::Replaced(r)) => format!(
            "re-placed cpus {} -> {} ({})",
            cpulist(&r.old_cpus),
            r.placement
                .as_ref()
                .map_or("-".into(), |p| cpulist(&p.cpus)),
            r.reason
        ),
        Some(Kind::Discovered(d)) => format!(
            "discovered pid {} class {} vcpus {}",
            pid(d.pid),
            class(d.confidential_class),
            d.vcpus
        ),
        None => "unknown".into(),
    };
    let (kind, detail) = what.split_once(' ').unwrap_or((what.as_str(), ""));
    format!(
        "{:>6}  {:<24} {:<10} {}",
        e.sequence,
        e.vm_id,
        kind,
        if detail.is_empty() { "-" } else { detail }
    )
}

/// The header line of `sevplacectl watch`, aligned with [`event`].
pub const EVENT_HEADER: &str = "   SEQ  VM                       EVENT      DETAIL";

/// One row of `sevplacectl top`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TopRow {
    pub(crate) vm_id: String,
    pub(crate) pid: u32,
    pub(crate) class: String,
    pub(crate) state: String,
    pub(crate) vcpus: u32,
    pub(crate) pinned: String,
    pub(crate) dirty: String,
    /// Dirty CPUs; `None` when the module does not track the VM.
    pub(crate) dirty_count: Option<u32>,
    /// L3 domains the next flush disturbs; `None` when not tracked.
    pub(crate) blast_l3: Option<u32>,
    /// Targeted flushes per second since the previous refresh.
    pub(crate) flushes_per_second: Option<f64>,
}

/// Rows for `top`; `prev` is the previous snapshot and the time since it.
pub(crate) fn top_rows(
    vms: &[pb::Vm],
    prev: Option<(std::time::Duration, &[pb::Vm])>,
) -> Vec<TopRow> {
    vms.iter()
        .map(|vm| {
            let flush = vm.flush.clone().unwrap_or_default();
            let rate = prev.and_then(|(dt, old)| {
                let before = old
                    .iter()
                    .find(|o| o.vm_id == vm.vm_id && o.pid == vm.pid)?;
                let was = before.flush.as_ref()?.flushes;
                let secs = dt.as_secs_f64();
                (secs > 0.0 && flush.tracked)
                    .then(|| flush.flushes.saturating_sub(was) as f64 / secs)
            });
            TopRow {
                vm_id: vm.vm_id.clone(),
                pid: vm.pid,
                class: class(vm.confidential_class),
                state: enum_name(pb::VmState::try_from(vm.state)),
                vcpus: vm.vcpus,
                pinned: vm
                    .placement
                    .as_ref()
                    .map_or("-".into(), |p| cpulist(&p.cpus)),
                dirty: if flush.tracked {
                    cpulist(&flush.dirty_cpus)
                } else {
                    "-".into()
                },
                dirty_count: flush
                    .tracked
                    .then_some(u32::try_from(flush.dirty_cpus.len()).unwrap_or(u32::MAX)),
                blast_l3: flush.tracked.then_some(flush.blast_radius_l3_domains),
                flushes_per_second: rate,
            }
        })
        .collect()
}

/// The `top` screen.
pub(crate) fn top(h: &pb::Host, rows: &[TopRow]) -> String {
    let mut o = String::new();
    let m = h.module.clone().unwrap_or_default();
    let _ = writeln!(
        o,
        "sevplace top  host {}  vms {}  pool L3 {}  sevflush {} {}",
        h.hostname,
        h.vm_count,
        cpulist(&h.confidential_pool_l3_domains),
        enum_name(pb::ModuleState::try_from(m.state)),
        m.mode
    );
    let _ = writeln!(
        o,
        "{:<24} {:>8} {:<8} {:<10} {:>5} {:<16} {:<16} {:>5} {:>9}",
        "VM", "PID", "CLASS", "STATE", "VCPUS", "PINNED", "DIRTY", "L3HIT", "FLUSH/S"
    );
    for r in rows {
        let rate = r
            .flushes_per_second
            .map_or("-".into(), |v| format!("{v:.1}"));
        let l3 = r.blast_l3.map_or("-".into(), |v| v.to_string());
        let _ = writeln!(
            o,
            "{:<24} {:>8} {:<8} {:<10} {:>5} {:<16} {:<16} {:>5} {:>9}",
            r.vm_id,
            pid(r.pid),
            r.class,
            r.state,
            r.vcpus,
            r.pinned,
            r.dirty,
            l3,
            rate
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_rate_from_two_snapshots() {
        let vm = |flushes| pb::Vm {
            vm_id: "a".into(),
            pid: 7,
            vcpus: 2,
            flush: Some(pb::FlushStatus {
                tracked: true,
                dirty_cpus: vec![1, 2],
                flushes,
                blast_radius_l3_domains: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let old = [vm(10)];
        let rows = top_rows(&[vm(30)], Some((std::time::Duration::from_secs(2), &old)));
        assert_eq!(rows[0].flushes_per_second, Some(10.0));
        assert_eq!(rows[0].dirty, "1-2");
        assert_eq!(top_rows(&[vm(30)], None)[0].flushes_per_second, None);
        let screen = top(&pb::Host::default(), &rows);
        assert!(
            screen.contains("FLUSH/S") && screen.contains("10.0"),
            "{screen}"
        );
    }

    #[test]
    fn empty_values_are_dashes_everywhere() {
        let vm = pb::Vm {
            vm_id: "web1".into(),
            pid: 0,
            vcpus: 2,
            ..Default::default()
        };
        let rows = top_rows(std::slice::from_ref(&vm), None);
        assert_eq!(rows[0].blast_l3, None);
        let top_line = top(&pb::Host::default(), &rows)
            .lines()
            .nth(2)
            .unwrap_or_default()
            .to_string();
        let vms_line = vms(std::slice::from_ref(&vm))
            .lines()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        for line in [&top_line, &vms_line] {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // VM PID CLASS STATE VCPUS PINNED DIRTY L3HIT [FLUSH/S]
            assert_eq!(cols[1], "-", "{line}");
            assert_eq!(cols[5], "-", "{line}");
            assert_eq!(cols[6], "-", "{line}");
            assert_eq!(cols[7], "-", "{line}");
        }
        assert!(vm_text_has_no_pid_0(&super::vm(&vm)));
        let ev = pb::Event {
            sequence: 11,
            vm_id: "pid-7701".into(),
            kind: Some(pb::event::Kind::Exited(pb::VmExited { pid: 7701 })),
            ..Default::default()
        };
        let line = event(&ev);
        assert_eq!(line, "    11  pid-7701                 exited     pid 7701");
        assert_eq!(
            EVENT_HEADER.find("EVENT"),
            line.find("exited"),
            "{EVENT_HEADER}\n{line}"
        );
    }

    fn vm_text_has_no_pid_0(text: &str) -> bool {
        text.lines().any(|l| l == "pid         -") && !text.contains("pid         0")
    }
}
