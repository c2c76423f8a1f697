//! The agent library's modules import downward only, in the layers that
//! docs/architecture.md lists (the block after the `import-direction`
//! marker): a module may use modules of lower layers, never one of its own
//! layer or above, so there is no import cycle. This test reads every
//! `crate::` path in agent/src (comments, `tests.rs` files and inline
//! `#[cfg(test)] mod tests` left out: tests may reach anywhere) and fails
//! on an edge against that order, or on a module the document does not
//! place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MARKER: &str = "<!-- import-direction";

/// Root re-exports of lib.rs and the module each comes from.
const ROOT_ITEMS: [(&str, &str); 3] = [
    ("CpuSet", "cpuset"),
    ("ConfidentialClass", "types"),
    ("VmId", "types"),
];

/// Layers from the document, top first: module name -> layer number.
fn documented_layers(doc: &str) -> BTreeMap<String, usize> {
    let after = doc
        .split_once(MARKER)
        .map(|(_, rest)| rest)
        .expect("docs/architecture.md has the import-direction marker");
    let block = after
        .split_once("```text\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("a ```text block follows the marker");
    let mut layers = BTreeMap::new();
    for (n, line) in block.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        for name in line.split_whitespace() {
            let name = name.trim_end_matches('/');
            assert!(
                layers.insert(name.to_string(), n).is_none(),
                "{name} is listed twice in the import-direction block"
            );
        }
    }
    layers
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`None` for lib.rs and the
/// binaries, which sit above every module).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// The code of a file without comments and without its inline test module.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod tests {"))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The first path segment of every `crate::` path, and of each item of a
/// `crate::{..}` group.
fn crate_targets(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let prefix_ok = rest[..i]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '$'));
        rest = &rest[i + "crate::".len()..];
        if !prefix_ok {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn modules_import_downward_only() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(manifest.join("../docs/architecture.md")).unwrap();
    let layers = documented_layers(&doc);
    let src = manifest.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        seen.insert(from.clone());
        let Some(&from_layer) = layers.get(&from) else {
            errors.push(format!(
                "module {from} ({}) is not in the import-direction block",
                file.display()
            ));
            continue;
        };
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for target in crate_targets(&code_of(&text)) {
            let to = ROOT_ITEMS
                .iter()
                .find(|(item, _)| *item == target)
                .map_or(target.as_str(), |(_, m)| m);
            if to == from {
                continue;
            }
            match layers.get(to) {
                None => errors.push(format!(
                    "{}: crate::{target} is not a module of the import-direction block",
                    file.display()
                )),
                Some(&to_layer) if to_layer <= from_layer => errors.push(format!(
                    "{}: {from} (layer {from_layer}) uses {to} (layer {to_layer}): imports run downward only",
                    file.display()
                )),
                Some(_) => {}
            }
        }
    }
    for name in layers.keys() {
        if !seen.contains(name) {
            errors.push(format!(
                "{name} is in the import-direction block but not a module"
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_checker_sees_upward_edges_and_groups() {
    let code = code_of(
        "use crate::{CpuSet, metrics::Metrics};\n// crate::api in a comment\nlet x = crate::reconcile::AgentCore;\n#[cfg(test)]\nmod tests {\n    use crate::daemon;\n}\n",
    );
    let targets: Vec<String> = crate_targets(&code).into_iter().collect();
    assert_eq!(targets, ["CpuSet", "metrics", "reconcile"]);
    let layers = documented_layers("<!-- import-direction -->\n```text\na b\nc\n```\n");
    assert_eq!(layers["a"], 0);
    assert_eq!(layers["b"], 0);
    assert_eq!(layers["c"], 1);
}
