//! Markdown reference of the API, generated from the proto comments in the
//! descriptor set (docs/api.md is this output, checked by a test).

use prost::Message;
use prost_types::source_code_info::Location;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};

/// A proto element without a leading comment, by full name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undocumented(pub Vec<String>);

fn comment(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let loc: &Location = info.location.iter().find(|l| l.path == path)?;
    let c = loc.leading_comments.as_deref()?.trim();
    (!c.is_empty()).then(|| c.lines().map(str::trim).collect::<Vec<_>>().join(" "))
}

/// Index `i` of an element as a step of a source-code-info path (paths
/// are `int32`); an index past `i32::MAX` becomes `i32::MAX`, a path that
/// names no comment, so the element is reported as undocumented.
fn path_index(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

struct Writer<'a> {
    file: &'a FileDescriptorProto,
    out: String,
    missing: Vec<String>,
}

impl Writer<'_> {
    fn doc(&mut self, path: &[i32], name: &str) -> String {
        match comment(self.file, path) {
            Some(c) => c,
            None => {
                self.missing.push(name.to_string());
                String::new()
            }
        }
    }

    fn message(&mut self, m: &DescriptorProto, path: Vec<i32>, prefix: &str) {
        let name = format!("{prefix}{}", m.name());
        let d = self.doc(&path, &name);
        self.out.push_str(&format!("### `{name}`\n\n{d}\n\n"));
        if !m.field.is_empty() {
            self.out
                .push_str("| field | type | description |\n|---|---|---|\n");
            for (i, f) in m.field.iter().enumerate() {
                let mut p = path.clone();
                p.extend([2, path_index(i)]);
                let fd = self.doc(&p, &format!("{name}.{}", f.name()));
                let label = if f.label() == prost_types::field_descriptor_proto::Label::Repeated {
                    "repeated "
                } else if f.proto3_optional() {
                    "optional "
                } else {
                    ""
                };
                let ty = match f.type_name() {
                    "" => format!("{:?}", f.r#type()).to_lowercase(),
                    t => t.trim_start_matches('.').to_string(),
                };
                let oneof = f
                    .oneof_index
                    .filter(|_| !f.proto3_optional())
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| m.oneof_decl.get(i))
                    .map(|o| format!(" (oneof `{}`)", o.name()))
                    .unwrap_or_default();
                self.out.push_str(&format!(
                    "| `{}` | {label}`{ty}` | {fd}{oneof} |\n",
                    f.name()
                ));
            }
            self.out.push('\n');
        }
    }

    fn enumeration(&mut self, e: &EnumDescriptorProto, path: Vec<i32>) {
        let d = self.doc(&path, e.name());
        self.out.push_str(&format!(
            "### enum `{}`\n\n{d}\n\n| value | number | description |\n|---|---|---|\n",
            e.name()
        ));
        for (i, v) in e.value.iter().enumerate() {
            let mut p = path.clone();
            p.extend([2, path_index(i)]);
            let vd = self.doc(&p, &format!("{}.{}", e.name(), v.name()));
            self.out
                .push_str(&format!("| `{}` | {} | {vd} |\n", v.name(), v.number()));
        }
        self.out.push('\n');
    }
}

/// Renders the `sevplace.*` files of an encoded descriptor set; also
/// returns every element that has no comment.
pub fn markdown(descriptor_set: &[u8]) -> Result<(String, Undocumented), prost::DecodeError> {
    let fds = FileDescriptorSet::decode(descriptor_set)?;
    let mut out = String::from(
        "# sevplace.v1 API reference\n\nGenerated from the comments in `proto/sevplace/v1/*.proto` by \
         `SEVPLACE_BLESS=1 cargo test -p sevplace-proto --test api_doc`; do not edit by hand.\n\n",
    );
    let mut missing = Vec::new();
    for file in fds
        .file
        .iter()
        .filter(|f| f.package().starts_with("sevplace."))
    {
        let mut w = Writer {
            file,
            out: String::new(),
            missing: Vec::new(),
        };
        w.out.push_str(&format!(
            "## `{}` (package `{}`)\n\n",
            file.name(),
            file.package()
        ));
        for (si, s) in file.service.iter().enumerate() {
            let d = w.doc(&[6, path_index(si)], s.name());
            w.out.push_str(&format!("### service `{}`\n\n{d}\n\n| rpc | request | response | description |\n|---|---|---|---|\n", s.name()));
            for (mi, m) in s.method.iter().enumerate() {
                let md = w.doc(
                    &[6, path_index(si), 2, path_index(mi)],
                    &format!("{}.{}", s.name(), m.name()),
                );
                let stream = if m.server_streaming() { "stream " } else { "" };
                w.out.push_str(&format!(
                    "| `{}` | `{}` | {stream}`{}` | {md} |\n",
                    m.name(),
                    m.input_type().trim_start_matches('.'),
                    m.output_type().trim_start_matches('.')
                ));
            }
            w.out.push('\n');
        }
        w.out.push_str("## Enums\n\n");
        for (i, e) in file.enum_type.iter().enumerate() {
            w.enumeration(e, vec![5, path_index(i)]);
        }
        w.out.push_str("## Messages\n\n");
        for (i, m) in file.message_type.iter().enumerate() {
            w.message(m, vec![4, path_index(i)], "");
        }
        out.push_str(&w.out);
        missing.extend(w.missing);
    }
    Ok((out, Undocumented(missing)))
}
