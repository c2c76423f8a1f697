//! Property checks over untrusted input, shared by the `cargo fuzz` targets
//! (`fuzz/fuzz_targets/`) and the corpus replay test
//! (`agent/tests/fuzz_corpus.rs`).
//!
//! Each `check_*` function takes arbitrary bytes, runs them through one
//! parser family, and panics only when a property that must hold for every
//! input is broken: a parsed value that does not survive formatting and
//! parsing again, a result that contradicts the parser's documented rules,
//! or a panic inside the parser itself. Rejecting the input is never a
//! failure.

use std::path::{Component, Path, PathBuf};

use crate::cgroup::{self, CgroupHost, CpusetWriter, Hierarchy};
use crate::cpuset::{CpuListError, CpuSet, MAX_CPU_ID};
use crate::discovery::cgroup_path::{
    libvirt_vcpu_index, parse_libvirt_path, parse_proc_cgroup, systemd_unescape,
};
use crate::discovery::cmdline::{
    classify_cmdline, parse_proc_cmdline, Classification, SEV_POLICY_ES,
};
use crate::discovery::procfs::{
    is_vm_fd, parse_stat, parse_status_cpus_allowed, parse_syscall_kvm_run_fd, vcpu_fd_index,
    TaskStat,
};
use crate::kmod;
use crate::simulate::{Format, Trace};
use crate::state::{self, CHECKPOINT_FORMAT, CHECKPOINT_VERSION};
use crate::ConfidentialClass;

/// A fuzz target: its name (the directory under `fuzz/corpus/` and
/// `fuzz/regressions/`, and the file under `fuzz/fuzz_targets/`) and its
/// check.
pub(crate) type Target = (&'static str, fn(&[u8]));

/// Every fuzz target.
pub const TARGETS: &[Target] = &[
    ("cpulist", check_cpulist),
    ("procfs", check_procfs),
    ("cgroupfs", check_cgroupfs),
    ("sevflush", check_sevflush),
    ("qemu_cmdline", check_qemu_cmdline),
    ("trace", check_trace),
    ("checkpoint", check_checkpoint),
];

/// The check of the target named `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// The files the agent reads with `read_to_string` are rejected when they
/// are not UTF-8 before any parser sees them; the process-controlled
/// `stat` and `cmdline` are read lossily instead (`procfs::LossyText`).
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Asserts that `err` names a token of `input` (what the operator is shown).
fn assert_names_token(input: &str, err: &CpuListError) {
    let CpuListError::BadToken { token, .. } = err;
    assert!(
        input.trim().split(',').any(|t| t == token),
        "error {err} names no token of {input:?}"
    );
}

/// Asserts that `set` is formatted as a cpulist that parses back to `set`.
fn assert_cpulist_round_trip(set: &CpuSet) {
    assert!(
        set.iter().all(|c| c <= MAX_CPU_ID),
        "{set:?} holds a CPU above {MAX_CPU_ID}"
    );
    let formatted = set.to_string();
    match CpuSet::parse(&formatted) {
        Ok(back) => {
            assert_eq!(&back, set, "{formatted:?} parses to another set");
            assert_eq!(back.to_string(), formatted, "formatting is not canonical");
        }
        Err(e) => panic!("formatted set {formatted:?} does not parse: {e}"),
    }
    assert_eq!(CpuSet::try_from_ids(&set.to_vec()).as_ref(), Ok(set));
}

/// Cpulists (`0-3,8`) and hex cpumasks (`ff,ffffffff`): a parsed set
/// formats to a canonical cpulist that parses back to the same set; an
/// error names a token of the input.
pub fn check_cpulist(data: &[u8]) {
    let Some(input) = text(data) else { return };
    match CpuSet::parse(input) {
        Ok(set) => {
            assert_cpulist_round_trip(&set);
            let again = CpuSet::parse(&format!(" {set}\n"));
            assert_eq!(
                again.as_ref(),
                Ok(&set),
                "surrounding whitespace changes {set}"
            );
        }
        Err(e) => assert_names_token(input, &e),
    }
    match CpuSet::parse_mask(input) {
        Ok(set) => assert_cpulist_round_trip(&set),
        Err(e) => assert_names_token(input, &e),
    }
}

/// A `stat` line with the fields of `st` and zeros elsewhere.
fn stat_line(st: &TaskStat) -> String {
    // Fields 3 to 39; field N is at index N - 3.
    let mut fields: Vec<String> = vec!["0".to_string(); 37];
    fields[0] = st.state.to_string();
    fields[9 - 3] = st.flags.to_string();
    fields[22 - 3] = st.start_time.to_string();
    fields[39 - 3] = st.last_cpu.map_or("-1".to_string(), |c| c.to_string());
    format!("1 ({}) {}\n", st.comm, fields.join(" "))
}

/// procfs files: `stat` (comm with spaces and parentheses; parsed by the
/// `procfs` crate behind `parse_stat`'s shape check, which must keep every
/// input the crate's parser would slice out of bounds away from it),
/// `status` (`Cpus_allowed_list`, read on fixture trees), fd link targets
/// and `syscall`. Each parsed value, written back in the kernel's format,
/// parses to the same value.
pub fn check_procfs(data: &[u8]) {
    // `stat` is read lossily (the thread name need not be UTF-8).
    let lossy = String::from_utf8_lossy(data);
    if let Ok(st) = parse_stat(&lossy) {
        let line = stat_line(&st);
        assert_eq!(parse_stat(&line), Ok(st), "stat line {line:?}");
    }
    let Some(input) = text(data) else { return };
    if let Ok(set) = parse_status_cpus_allowed(input) {
        assert_cpulist_round_trip(&set);
        let status = format!("Name:\tqemu\nCpus_allowed_list:\t{set}\n");
        assert_eq!(parse_status_cpus_allowed(&status), Ok(set));
    }
    for link in std::iter::once(input).chain(input.lines()) {
        if let Some(n) = vcpu_fd_index(link) {
            assert_eq!(vcpu_fd_index(&format!("anon_inode:kvm-vcpu:{n}")), Some(n));
            assert!(!is_vm_fd(link), "{link:?} is both a vCPU and a VM fd");
        }
        if is_vm_fd(link) {
            assert_eq!(link, "anon_inode:kvm-vm");
        }
    }
    if let Some(fd) = parse_syscall_kvm_run_fd(input) {
        let line = format!("16 {fd:#x} 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f00\n");
        assert_eq!(parse_syscall_kvm_run_fd(&line), Some(fd));
    }
}

/// cgroupfs and `/proc/<pid>/cgroup`: the libvirt cgroup found in a
/// process's cgroup file is the one its paths name, and the vCPU cgroup
/// paths built from it lead back to it; id lists round-trip; `dir_of` never
/// leaves the hierarchy.
pub fn check_cgroupfs(data: &[u8]) {
    let Some(input) = text(data) else { return };
    match parse_proc_cgroup(input) {
        Ok(loc) => {
            let from_paths = loc
                .v1_cpuset
                .as_deref()
                .and_then(|p| parse_libvirt_path(p, Hierarchy::V1Cpuset))
                .or_else(|| {
                    loc.unified
                        .as_deref()
                        .and_then(|p| parse_libvirt_path(p, Hierarchy::Unified))
                });
            assert_eq!(loc.libvirt, from_paths);
            if let Some(lv) = &loc.libvirt {
                for index in [0, 7, u32::MAX] {
                    let vcpu = lv.vcpu_path(index);
                    assert_eq!(libvirt_vcpu_index(&vcpu), Some(index), "{vcpu:?}");
                    assert_eq!(
                        parse_libvirt_path(&vcpu, lv.hierarchy).as_ref(),
                        Some(lv),
                        "vCPU cgroup {vcpu:?} names another machine"
                    );
                }
            }
        }
        Err(e) => {
            let line = input.lines().nth(e.line_no.saturating_sub(1));
            assert_eq!(line, Some(e.line.as_str()), "error names the wrong line");
        }
    }
    for line in input.lines() {
        if !line.contains('\\') {
            assert_eq!(systemd_unescape(line), line);
        }
        let _ = libvirt_vcpu_index(line);
    }
    if let Ok(ids) = cgroup::parse_thread_ids(input) {
        let written: String = ids.iter().map(|id| format!("{id}\n")).collect();
        assert_eq!(cgroup::parse_thread_ids(&written).as_ref(), Ok(&ids));
    }
    let _ = cgroup::lists_cpuset(input);
    let mount = PathBuf::from("/sys/fs/cgroup");
    for hierarchy in [Hierarchy::Unified, Hierarchy::V1Cpuset] {
        let writer = CpusetWriter::new(CgroupHost {
            hierarchy,
            mount: mount.clone(),
        });
        if let Ok(dir) = writer.dir_of(input) {
            let rel = dir.strip_prefix(&mount).unwrap_or(Path::new(".."));
            assert!(
                rel.components().all(|c| matches!(c, Component::Normal(_))),
                "{input:?} leads to {dir:?}, outside {mount:?}"
            );
        }
    }
}

/// sevflush sysfs values: counters, `abi_version`, `mode`, `pid`, cpulists,
/// `unknown_past` and record names. A parsed value, written back as the
/// module writes it (value and newline), parses to the same value.
pub fn check_sevflush(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let number = kmod::parse_u64(input);
    if let Ok(n) = number {
        assert_eq!(kmod::parse_u64(&format!("{n}\n")), Ok(n));
    }
    for narrow in [kmod::parse_abi_version, kmod::parse_pid] {
        match (narrow(input), &number) {
            (Ok(v), Ok(n)) => assert_eq!(u64::from(v), *n),
            (Ok(v), Err(e)) => panic!("{v} accepted where the counter parser says {e}"),
            (Err(_), Ok(n)) => assert!(*n > u64::from(u32::MAX), "{n} rejected"),
            (Err(_), Err(_)) => {}
        }
    }
    if let Ok(mode) = kmod::parse_mode(input) {
        assert!(mode == "observe" || mode == "targeted", "mode {mode:?}");
        assert_eq!(kmod::parse_mode(&format!("{mode}\n")), Ok(mode));
    }
    if let Ok(set) = kmod::parse_cpulist(input) {
        assert_cpulist_round_trip(&set);
        assert_eq!(kmod::parse_cpulist(&format!("{set}\n")), Ok(set));
    }
    let past = kmod::parse_unknown_past(input);
    assert_eq!(past, kmod::parse_unknown_past(&format!("{input}\n")));
    if let Some(id) = kmod::parse_record_name(input) {
        assert_eq!(kmod::parse_record_name(&id.to_string()), Some(id));
    }
}

/// The QEMU command-line classifier over `/proc/<pid>/cmdline` text
/// (NUL-separated arguments): deterministic, independent of the directory
/// of the program, and consistent with its rules (module docs of
/// `discovery::cmdline`).
pub fn check_qemu_cmdline(data: &[u8]) {
    // The command line is read lossily (it need not be UTF-8).
    let input = String::from_utf8_lossy(data);
    let args = parse_proc_cmdline(&input);
    assert!(args.iter().all(|a| !a.is_empty() && !a.contains('\0')));
    let c: Classification = classify_cmdline(&args);
    assert_eq!(classify_cmdline(&args), c, "not deterministic");
    if c.is_qemu {
        assert!(c.class.is_some(), "a QEMU command line has a class");
    }
    if c.guest_name.is_some() {
        assert!(c.is_qemu, "-name without QEMU");
    }
    let sev = matches!(
        c.class,
        Some(ConfidentialClass::Sev | ConfidentialClass::SevEs | ConfidentialClass::SevSnp)
    );
    if c.sev_object_id.is_some() || c.sev_policy.is_some() {
        assert!(sev, "SEV object details without an SEV class: {c:?}");
    }
    match c.class {
        Some(ConfidentialClass::SevEs) => assert!(
            c.sev_policy.is_some_and(|p| p & SEV_POLICY_ES != 0),
            "SEV-ES without the ES policy bit: {c:?}"
        ),
        Some(ConfidentialClass::Sev) => assert!(
            c.sev_policy.is_none_or(|p| p & SEV_POLICY_ES == 0),
            "SEV with the ES policy bit: {c:?}"
        ),
        _ => {}
    }
    if let Some(program) = args.first() {
        let mut moved = args.clone();
        moved[0] = format!("/usr/bin/{program}");
        assert_eq!(
            classify_cmdline(&moved),
            c,
            "the program's directory matters"
        );
    }
}

/// Trace files in JSON and YAML: an accepted trace, written with
/// `to_json` and `to_yaml`, reads back equal.
pub fn check_trace(data: &[u8]) {
    let Some(input) = text(data) else { return };
    for format in [Format::Json, Format::Yaml] {
        let Ok(trace) = Trace::parse(input, format, "fuzz") else {
            continue;
        };
        let end = trace.end();
        assert!(end.is_finite() && end >= 0.0, "end {end}");
        for (written, format) in [
            (trace.to_json(), Format::Json),
            (trace.to_yaml(), Format::Yaml),
        ] {
            match Trace::parse(&written, format, "written") {
                Ok(back) => assert_eq!(back, trace, "{format:?} as written: {written}"),
                Err(e) => panic!("{format:?} as written does not read back: {e}\n{written}"),
            }
        }
    }
}

/// The checkpoint document: an accepted checkpoint keeps the documented
/// order of intents, and `decode(encode(c)) == c`. The input is tried as a
/// whole document and as a payload wrapped in a valid envelope (so the
/// payload parsers are reached without the fuzzer having to solve CRC-32):
/// as version 1, which is migrated, as version 2, and as the current
/// version; and as a journal ([`state::journal::replay`]).
pub fn check_checkpoint(data: &[u8]) {
    check_checkpoint_document(data);
    if let Some(payload) = text(data) {
        let payload = payload.trim();
        for version in [1, 2, CHECKPOINT_VERSION] {
            let doc = format!(
                r#"{{"format":"{CHECKPOINT_FORMAT}","version":{version},"crc32":"{:08x}","payload":{payload}}}"#,
                crc32fast::hash(payload.as_bytes())
            );
            check_checkpoint_document(doc.as_bytes());
        }
    }
    check_journal(data);
}

/// The input as a checkpoint journal replayed onto an empty checkpoint: a
/// replay that succeeds leaves the intents in order, and the change it made
/// written as one record replays to the same checkpoint.
fn check_journal(data: &[u8]) {
    let mut replayed = state::Checkpoint::default();
    if state::journal::replay(data, &mut replayed).is_err() {
        return;
    }
    assert!(
        replayed.intents.windows(2).all(|w| w[0].vm_id < w[1].vm_id),
        "replayed intents out of order or repeated"
    );
    if replayed.generation == 0 {
        return;
    }
    let delta = state::journal::Delta::between(&state::Checkpoint::default(), &replayed);
    let line = match state::journal::encode_line(&delta) {
        Ok(l) => l,
        Err(e) => panic!("a replayed change does not encode: {e}"),
    };
    let mut again = state::Checkpoint::default();
    assert_eq!(
        state::journal::replay(&line, &mut again).map(|r| r.applied),
        Ok(1)
    );
    assert_eq!(again, replayed);
}

fn check_checkpoint_document(bytes: &[u8]) {
    let Ok(checkpoint) = state::decode(bytes) else {
        return;
    };
    assert!(
        checkpoint
            .intents
            .windows(2)
            .all(|w| w[0].vm_id < w[1].vm_id),
        "intents out of order or repeated"
    );
    let encoded = match state::encode(&checkpoint) {
        Ok(e) => e,
        Err(e) => panic!("a decoded checkpoint does not encode: {e}"),
    };
    assert_eq!(state::decode(&encoded).as_ref(), Ok(&checkpoint));
    assert_eq!(
        state::encode(&checkpoint).ok(),
        Some(encoded),
        "encode varies"
    );
}
