//! Confidential class and guest name from a VMM command line.
//!
//! QEMU is configured for AMD SEV by a memory-encryption object and a machine
//! property that points at it:
//!
//! ```text
//! -object sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x5
//! -object '{"qom-type":"sev-snp-guest","id":"lsec0","policy":196608}'   (libvirt >= 7 JSON syntax)
//! -machine q35,confidential-guest-support=sev0                         (QEMU >= 6.0)
//! -machine q35,memory-encryption=sev0                                  (older QEMU)
//! ```
//!
//! Rules applied by [`classify_cmdline`]:
//! 1. When `-machine` names an object (`confidential-guest-support=` or
//!    `memory-encryption=`) and that object is `sev-snp-guest`, the class is
//!    SEV-SNP; `sev-guest` with policy bit 0x4 (ES) set is SEV-ES, else SEV.
//!    A named object of another type (`tdx-guest`, `s390-pv-guest`, ...) is
//!    not AMD SEV: class `None`.
//! 2. When no machine property names an object but a `sev-guest` or
//!    `sev-snp-guest` object exists, that object decides (the command line
//!    declares a confidential guest; treating it as one is the safe side).
//! 3. A QEMU command line (program name `qemu*` or any `-machine`/`-M`/
//!    `-name`/`-object` option) without SEV objects is class `None`.
//! 4. Any other program is of unknown class (`class: None` in the result),
//!    except cloud-hypervisor's `--platform ...sev_snp=on`, which is SEV-SNP.
//!
//! The `sev-guest` policy defaults to 0x1 in QEMU when absent (SEV).

use crate::ConfidentialClass;

/// SEV guest policy bit that requests SEV-ES.
pub(crate) const SEV_POLICY_ES: u64 = 0x4;

/// What a command line says about a guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Classification {
    /// The confidential class, or `None` when the program is not recognised.
    pub(crate) class: Option<ConfidentialClass>,
    /// `NAME` from `-name guest=NAME` or `-name NAME`.
    pub(crate) guest_name: Option<String>,
    /// The `id` of the SEV object that decided the class.
    pub(crate) sev_object_id: Option<String>,
    /// The SEV policy of that object, when given.
    pub(crate) sev_policy: Option<u64>,
    /// Whether the command line is recognisably QEMU's.
    pub(crate) is_qemu: bool,
}

/// One `-object` from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QemuObject {
    qom_type: String,
    id: Option<String>,
    policy: Option<u64>,
}

/// Splits a QEMU option string `a,b=c,d=e,,f` into `(key, value)` pairs; a
/// pair without `=` has an empty key (the "implied" first key, e.g. the
/// object type or machine type). `,,` is an escaped comma.
fn split_qemu_opts(s: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (String::new(), p),
        })
        .collect()
}

/// Parses an integer the way QEMU's option parser does: `0x` hexadecimal,
/// leading `0` octal, else decimal.
fn parse_qemu_uint(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses one `-object` argument, in either the `type,key=value` or the JSON
/// syntax.
fn parse_object(arg: &str) -> Option<QemuObject> {
    if arg.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(arg).ok()?;
        let qom_type = v.get("qom-type")?.as_str()?.to_string();
        let id = v.get("id").and_then(|i| i.as_str()).map(str::to_string);
        let policy = match v.get("policy") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => parse_qemu_uint(s),
            _ => None,
        };
        return Some(QemuObject {
            qom_type,
            id,
            policy,
        });
    }
    let opts = split_qemu_opts(arg);
    let mut qom_type = None;
    let mut id = None;
    let mut policy = None;
    for (k, v) in opts {
        match k.as_str() {
            "" | "qom-type" if qom_type.is_none() => qom_type = Some(v),
            "id" => id = Some(v),
            "policy" => policy = parse_qemu_uint(&v),
            _ => {}
        }
    }
    Some(QemuObject {
        qom_type: qom_type?,
        id,
        policy,
    })
}

/// Class of one object, when it is an AMD SEV object.
fn sev_class_of(obj: &QemuObject) -> Option<ConfidentialClass> {
    match obj.qom_type.as_str() {
        "sev-snp-guest" => Some(ConfidentialClass::SevSnp),
        "sev-guest" => {
            // QEMU's default sev-guest policy is 0x1 (no debugging): plain SEV.
            let policy = obj.policy.unwrap_or(0x1);
            if policy & SEV_POLICY_ES != 0 {
                Some(ConfidentialClass::SevEs)
            } else {
                Some(ConfidentialClass::Sev)
            }
        }
        _ => None,
    }
}

/// Returns the value of a QEMU option given as `-opt VALUE`, `--opt VALUE`,
/// `-opt=VALUE` or `--opt=VALUE`, for each occurrence.
fn option_values<'a>(args: &'a [String], names: &[&str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let bare = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
        if let Some(bare) = bare {
            if let Some((k, v)) = bare.split_once('=') {
                if names.contains(&k) {
                    out.push(v);
                }
            } else if names.contains(&bare) {
                if let Some(v) = args.get(i + 1) {
                    out.push(v.as_str());
                    i += 1;
                }
            }
        }
        i += 1;
    }
    out
}

/// Splits the text of `/proc/<pid>/cmdline` (NUL-terminated arguments)
/// into arguments; empty arguments are dropped.
pub(crate) fn parse_proc_cmdline(text: &str) -> Vec<String> {
    text.split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Classifies a VMM command line (`argv`, program first). Pure; see the
/// module documentation for the rules.
pub(crate) fn classify_cmdline(args: &[String]) -> Classification {
    let mut out = Classification::default();
    let program = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a.as_str()))
        .unwrap_or("");
    // Options follow the program; the program name itself is never one.
    let options = args.get(1..).unwrap_or_default();

    let objects: Vec<QemuObject> = option_values(options, &["object"])
        .into_iter()
        .filter_map(parse_object)
        .collect();
    let machines = option_values(options, &["machine", "M"]);
    let names = option_values(options, &["name"]);

    out.is_qemu = program.starts_with("qemu")
        || !objects.is_empty()
        || !machines.is_empty()
        || !names.is_empty();

    for n in names {
        for (k, v) in split_qemu_opts(n) {
            if k == "guest" || (k.is_empty() && out.guest_name.is_none()) {
                out.guest_name = Some(v);
            }
        }
    }

    // The object the machine names, if any (last occurrence wins, as in QEMU).
    let mut referenced: Option<String> = None;
    for m in machines {
        for (k, v) in split_qemu_opts(m) {
            if k == "confidential-guest-support" || k == "memory-encryption" {
                referenced = Some(v);
            }
        }
    }

    let deciding = match &referenced {
        Some(id) => objects.iter().find(|o| o.id.as_deref() == Some(id)),
        None => objects.iter().find(|o| sev_class_of(o).is_some()),
    };

    if let Some(obj) = deciding {
        out.class = Some(sev_class_of(obj).unwrap_or(ConfidentialClass::None));
        if sev_class_of(obj).is_some() {
            out.sev_object_id = obj.id.clone();
            out.sev_policy = obj.policy;
        }
    } else if out.is_qemu {
        out.class = Some(ConfidentialClass::None);
    } else if program.starts_with("cloud-hypervisor") {
        let snp = option_values(options, &["platform"]).into_iter().any(|p| {
            split_qemu_opts(p)
                .iter()
                .any(|(k, v)| k == "sev_snp" && v == "on")
        });
        out.class = Some(if snp {
            ConfidentialClass::SevSnp
        } else {
            ConfidentialClass::None
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConfidentialClass::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn table() {
        let cases: &[(&str, Option<ConfidentialClass>, Option<&str>)] = &[
            // Plain QEMU.
            ("/usr/bin/qemu-system-x86_64 -accel kvm -smp 2", Some(None), Option::None),
            ("qemu-system-x86_64 -name guest=vm1,debug-threads=on", Some(None), Some("vm1")),
            ("qemu-kvm -name oldstyle", Some(None), Some("oldstyle")),
            // SEV with the modern machine property.
            (
                "qemu-system-x86_64 -name guest=s1 -object sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x1 -machine q35,confidential-guest-support=sev0",
                Some(Sev),
                Some("s1"),
            ),
            // SEV-ES by policy bit 0x4 (hex, decimal and octal spellings).
            (
                "qemu-system-x86_64 -object sev-guest,id=sev0,policy=0x5 -machine q35,confidential-guest-support=sev0",
                Some(SevEs),
                Option::None,
            ),
            (
                "qemu-system-x86_64 -object sev-guest,id=sev0,policy=7 -machine q35,confidential-guest-support=sev0",
                Some(SevEs),
                Option::None,
            ),
            (
                "qemu-system-x86_64 -object sev-guest,id=sev0,policy=04 -M q35,confidential-guest-support=sev0",
                Some(SevEs),
                Option::None,
            ),
            // Default policy (absent) is plain SEV.
            (
                "qemu-system-x86_64 -object sev-guest,id=sev0 -machine q35,memory-encryption=sev0",
                Some(Sev),
                Option::None,
            ),
            // SNP.
            (
                "qemu-system-x86_64 -object sev-snp-guest,id=snp0,policy=0x30000 -machine q35,confidential-guest-support=snp0",
                Some(SevSnp),
                Option::None,
            ),
            // Double-dash and = forms.
            (
                "qemu-system-x86_64 --object=sev-snp-guest,id=x --machine=q35,confidential-guest-support=x",
                Some(SevSnp),
                Option::None,
            ),
            // Object present but unreferenced: still confidential.
            ("qemu-system-x86_64 -object sev-guest,id=sev0,policy=0x1", Some(Sev), Option::None),
            // Machine points at a non-SEV object: not AMD SEV.
            (
                "qemu-system-x86_64 -object tdx-guest,id=tdx0 -machine q35,confidential-guest-support=tdx0",
                Some(None),
                Option::None,
            ),
            // Machine points at the SNP object when both exist.
            (
                "qemu-system-x86_64 -object sev-guest,id=a,policy=0x5 -object sev-snp-guest,id=b -machine q35,confidential-guest-support=b",
                Some(SevSnp),
                Option::None,
            ),
            // Escaped comma in the guest name.
            ("qemu-system-x86_64 -name guest=a,,b,debug-threads=on", Some(None), Some("a,b")),
            // Unknown VMMs.
            ("/usr/bin/firecracker --api-sock /tmp/fc.sock", Option::None, Option::None),
            ("cloud-hypervisor --platform sev_snp=on --cpus boot=2", Some(SevSnp), Option::None),
            ("cloud-hypervisor --cpus boot=2", Some(None), Option::None),
            ("", Option::None, Option::None),
            // The test fixture carrying QEMU flags.
            (
                "/x/kvm-guest-fixture --vcpus 2 -name guest=foo -object sev-guest,id=sev0,policy=0x5 -machine q35,confidential-guest-support=sev0",
                Some(SevEs),
                Some("foo"),
            ),
        ];
        for (line, class, name) in cases {
            let c = classify_cmdline(&argv(line));
            assert_eq!(c.class, *class, "class of {line:?}");
            assert_eq!(c.guest_name.as_deref(), *name, "name of {line:?}");
        }
    }

    #[test]
    fn libvirt_json_objects() {
        let args = vec![
            "/usr/bin/qemu-system-x86_64".to_string(),
            "-name".to_string(),
            "guest=vm-json,debug-threads=on".to_string(),
            "-machine".to_string(),
            "pc-q35-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram,confidential-guest-support=lsec0".to_string(),
            "-object".to_string(),
            r#"{"qom-type":"sev-guest","id":"lsec0","cbitpos":51,"reduced-phys-bits":1,"policy":7}"#
                .to_string(),
        ];
        let c = classify_cmdline(&args);
        assert_eq!(c.class, Some(SevEs));
        assert_eq!(c.sev_object_id.as_deref(), Some("lsec0"));
        assert_eq!(c.sev_policy, Some(7));
        assert_eq!(c.guest_name.as_deref(), Some("vm-json"));

        let snp = vec![
            "qemu-system-x86_64".to_string(),
            "-object".to_string(),
            r#"{"qom-type":"sev-snp-guest","id":"lsec0","policy":"0x30000"}"#.to_string(),
            "-machine".to_string(),
            "q35,confidential-guest-support=lsec0".to_string(),
        ];
        assert_eq!(classify_cmdline(&snp).class, Some(SevSnp));
        assert_eq!(classify_cmdline(&snp).sev_policy, Some(0x30000));
    }

    /// Found by the qemu_cmdline fuzz target: the program name was scanned
    /// as an option, so a process named `-object` (argv[0] is set by the
    /// process) was taken for QEMU, or for an SEV guest.
    #[test]
    fn program_name_is_not_an_option() {
        let named = |program: &str| {
            let mut args = vec![program.to_string()];
            args.extend(argv("sev-guest,id=x -nographic"));
            classify_cmdline(&args)
        };
        assert_eq!(named("-object"), Classification::default());
        assert_eq!(named("/usr/bin/-object"), Classification::default());
        let eq = vec!["--object=sev-guest,id=x".to_string()];
        assert_eq!(classify_cmdline(&eq), Classification::default());
    }

    #[test]
    fn garbage_does_not_panic() {
        for line in [
            vec!["-object".to_string()],
            vec![
                "qemu".to_string(),
                "-object".to_string(),
                "{not json".to_string(),
            ],
            vec![
                "qemu".to_string(),
                "-machine".to_string(),
                ",,,=,=".to_string(),
            ],
            vec![
                "qemu".to_string(),
                "-object".to_string(),
                "sev-guest,policy=zz".to_string(),
            ],
        ] {
            let _ = classify_cmdline(&line);
        }
    }
}
