//! A process's cgroup from `/proc/<pid>/cgroup`, and libvirt's layouts.
//!
//! `/proc/<pid>/cgroup` has one line per hierarchy: `ID:CONTROLLERS:PATH`.
//! cgroup v1 lines name their controllers (`7:cpuset:/machine/...`); the v2
//! line is `0::/path`. The cpuset controller lives in the v1 `cpuset`
//! hierarchy when one is mounted, else in the unified hierarchy.
//!
//! libvirt places each QEMU domain under a machine cgroup and each vCPU
//! thread in a child `vcpuN` (emulator threads in `emulator`, I/O threads in
//! `iothreadN`):
//!
//! | layout | path of vCPU 0 |
//! |---|---|
//! | systemd, libvirt >= 7.1 (v1 or v2) | `/machine.slice/machine-qemu\x2d1\x2dvm1.scope/libvirt/vcpu0` |
//! | systemd, libvirt < 7.1 | `/machine.slice/machine-qemu\x2d1\x2dvm1.scope/vcpu0` |
//! | no systemd (v1) | `/machine/vm1.libvirt-qemu/vcpu0` or `/machine/qemu-1-vm1.libvirt-qemu/vcpu0` |
//!
//! The scope name is systemd-escaped (`\x2d` is `-`) and carries the libvirt
//! domain id and the (possibly shortened) domain name: `qemu-ID-NAME`.

use crate::cgroup::Hierarchy;

/// How libvirt arranged a domain's cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LibvirtLayout {
    /// `machine-qemu\x2dN\x2dNAME.scope/libvirt/vcpuN` (libvirt >= 7.1).
    ScopeWithLibvirtDir,
    /// `machine-qemu\x2dN\x2dNAME.scope/vcpuN` (libvirt < 7.1), also reported
    /// when the path ends at the scope itself and the layout is not visible.
    Scope,
    /// `/machine/NAME.libvirt-qemu/vcpuN` (cgroup v1 without systemd).
    Partition,
}

/// A libvirt domain's machine cgroup, found from one of its threads' paths.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LibvirtCgroup {
    /// The hierarchy the path was read from.
    pub hierarchy: Hierarchy,
    /// Which of libvirt's layouts the path has.
    pub layout: LibvirtLayout,
    /// The machine cgroup: `/machine.slice/machine-qemu\x2d1\x2dvm1.scope`
    /// or `/machine/vm1.libvirt-qemu`.
    pub(crate) machine_path: String,
    /// libvirt's domain id (`qemu-ID-NAME`), when the name carries one.
    pub domain_id: Option<u32>,
    /// The domain name as the cgroup spells it (unescaped; libvirt shortens
    /// long names and drops characters systemd does not accept).
    pub domain_name: String,
}

impl LibvirtCgroup {
    /// The cgroup that holds the `vcpuN`, `emulator` and `iothreadN` children.
    pub(crate) fn thread_parent(&self) -> String {
        match self.layout {
            LibvirtLayout::ScopeWithLibvirtDir => format!("{}/libvirt", self.machine_path),
            LibvirtLayout::Scope | LibvirtLayout::Partition => self.machine_path.clone(),
        }
    }

    /// libvirt's cgroup of vCPU `index`.
    pub fn vcpu_path(&self, index: u32) -> String {
        format!("{}/vcpu{index}", self.thread_parent())
    }

    /// libvirt's cgroup of the emulator threads.
    pub(crate) fn emulator_path(&self) -> String {
        format!("{}/emulator", self.thread_parent())
    }
}

/// Where a process (or thread) sits in the cgroup hierarchies.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupLocation {
    /// Path in the v1 hierarchy that has the `cpuset` controller.
    pub v1_cpuset: Option<String>,
    /// Path in the v2 unified hierarchy (`0::PATH`).
    pub(crate) unified: Option<String>,
    /// The libvirt machine cgroup, when a path matches a libvirt layout (the
    /// cpuset hierarchy is checked first).
    pub libvirt: Option<LibvirtCgroup>,
}

/// Why a `/proc/<pid>/cgroup` text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line_no}: {line:?} is not ID:CONTROLLERS:PATH")]
pub struct CgroupFileError {
    pub(crate) line_no: usize,
    pub(crate) line: String,
}

/// Parses the text of `/proc/<pid>/cgroup` (or `.../task/<tid>/cgroup`).
pub fn parse_proc_cgroup(text: &str) -> Result<CgroupLocation, CgroupFileError> {
    let mut loc = CgroupLocation::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || CgroupFileError {
            line_no: i + 1,
            line: line.to_string(),
        };
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if id.parse::<u32>().is_err() || !path.starts_with('/') {
            return Err(bad());
        }
        if id == "0" && controllers.is_empty() {
            loc.unified = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "cpuset") {
            loc.v1_cpuset = Some(path.to_string());
        }
    }
    loc.libvirt = loc
        .v1_cpuset
        .as_deref()
        .and_then(|p| parse_libvirt_path(p, Hierarchy::V1Cpuset))
        .or_else(|| {
            loc.unified
                .as_deref()
                .and_then(|p| parse_libvirt_path(p, Hierarchy::Unified))
        });
    Ok(loc)
}

/// Decodes systemd's `\xHH` escapes (`machine-qemu\x2d1\x2dvm1.scope`).
pub(crate) fn systemd_unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes.get(i + 1) == Some(&b'x') {
            let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits libvirt's machine name `qemu-ID-NAME` into id and name; a name
/// without the prefix is returned whole.
fn split_machine_name(name: &str) -> (Option<u32>, String) {
    if let Some(rest) = name.strip_prefix("qemu-") {
        if let Some((id, dom)) = rest.split_once('-') {
            if let Ok(id) = id.parse::<u32>() {
                return (Some(id), dom.to_string());
            }
        }
    }
    (None, name.to_string())
}

/// Recognises a libvirt QEMU machine cgroup in `path` (any component of the
/// path; the slice or partition above it is free).
pub fn parse_libvirt_path(path: &str, hierarchy: Hierarchy) -> Option<LibvirtCgroup> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for (i, comp) in comps.iter().enumerate() {
        let machine_path = format!("/{}", comps[..=i].join("/"));
        let next = comps.get(i + 1).copied();
        if comp.starts_with("machine-qemu") && comp.ends_with(".scope") {
            let unescaped = systemd_unescape(comp);
            let machine = unescaped
                .strip_prefix("machine-")
                .and_then(|s| s.strip_suffix(".scope"))?;
            let (domain_id, domain_name) = split_machine_name(machine);
            let layout = if next == Some("libvirt") {
                LibvirtLayout::ScopeWithLibvirtDir
            } else {
                LibvirtLayout::Scope
            };
            return Some(LibvirtCgroup {
                hierarchy,
                layout,
                machine_path,
                domain_id,
                domain_name,
            });
        }
        if let Some(machine) = comp.strip_suffix(".libvirt-qemu") {
            let (domain_id, domain_name) = split_machine_name(&systemd_unescape(machine));
            return Some(LibvirtCgroup {
                hierarchy,
                layout: LibvirtLayout::Partition,
                machine_path,
                domain_id,
                domain_name,
            });
        }
    }
    None
}

/// The vCPU index of a libvirt `vcpuN` cgroup path, if it is one.
pub(crate) fn libvirt_vcpu_index(path: &str) -> Option<u32> {
    path.rsplit('/').next()?.strip_prefix("vcpu")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_modern_libvirt() {
        let text = "0::/machine.slice/machine-qemu\\x2d3\\x2dsev\\x2dvm.scope/libvirt/vcpu1\n";
        let loc = parse_proc_cgroup(text).unwrap();
        assert_eq!(loc.v1_cpuset, None);
        let lv = loc.libvirt.unwrap();
        assert_eq!(lv.hierarchy, Hierarchy::Unified);
        assert_eq!(lv.layout, LibvirtLayout::ScopeWithLibvirtDir);
        assert_eq!(lv.domain_id, Some(3));
        assert_eq!(lv.domain_name, "sev-vm");
        assert_eq!(
            lv.machine_path,
            "/machine.slice/machine-qemu\\x2d3\\x2dsev\\x2dvm.scope"
        );
        assert_eq!(
            lv.vcpu_path(0),
            "/machine.slice/machine-qemu\\x2d3\\x2dsev\\x2dvm.scope/libvirt/vcpu0"
        );
        assert_eq!(libvirt_vcpu_index(loc.unified.as_deref().unwrap()), Some(1));
    }

    #[test]
    fn v2_pre_7_1_libvirt() {
        let text = "0::/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/emulator\n";
        let lv = parse_proc_cgroup(text).unwrap().libvirt.unwrap();
        assert_eq!(lv.layout, LibvirtLayout::Scope);
        assert_eq!(lv.domain_name, "vm1");
        assert_eq!(
            lv.vcpu_path(2),
            "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/vcpu2"
        );
        assert_eq!(
            lv.emulator_path(),
            "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/emulator"
        );
    }

    #[test]
    fn v1_systemd_and_partition() {
        let text = "12:pids:/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope\n\
                    7:cpuset:/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/vcpu0\n\
                    1:name=systemd:/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope\n\
                    0::/\n";
        let loc = parse_proc_cgroup(text).unwrap();
        assert_eq!(
            loc.v1_cpuset.as_deref(),
            Some("/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/vcpu0")
        );
        assert_eq!(loc.unified.as_deref(), Some("/"));
        let lv = loc.libvirt.unwrap();
        assert_eq!(lv.hierarchy, Hierarchy::V1Cpuset);
        assert_eq!(lv.layout, LibvirtLayout::Scope);

        for (path, name, id) in [
            ("/machine/vm1.libvirt-qemu/vcpu3", "vm1", None),
            (
                "/machine/qemu-4-big-vm.libvirt-qemu/emulator",
                "big-vm",
                Some(4),
            ),
        ] {
            let text = format!("3:cpuset,cpu:{path}\n");
            let lv = parse_proc_cgroup(&text).unwrap().libvirt.unwrap();
            assert_eq!(lv.layout, LibvirtLayout::Partition);
            assert_eq!(lv.domain_name, name);
            assert_eq!(lv.domain_id, id);
            assert!(lv.vcpu_path(3).ends_with(".libvirt-qemu/vcpu3"));
        }
    }

    #[test]
    fn not_libvirt_and_garbage() {
        let loc = parse_proc_cgroup("0::/user.slice/user-0.slice/session-1.scope\n").unwrap();
        assert_eq!(loc.libvirt, None);
        assert!(parse_proc_cgroup("garbage\n").is_err());
        assert!(parse_proc_cgroup("x::/a\n").is_err());
        assert!(parse_proc_cgroup("0::relative\n").is_err());
        assert_eq!(parse_proc_cgroup("").unwrap(), CgroupLocation::default());
    }

    #[test]
    fn unescape() {
        assert_eq!(systemd_unescape("a\\x2db\\x5c"), "a-b\\");
        assert_eq!(systemd_unescape("tail\\x2"), "tail\\x2");
        assert_eq!(systemd_unescape("\\xzz"), "\\xzz");
    }
}
