//! docs/api.md is generated from the proto comments, and every service,
//! method, message, field, enum and value has a comment.

#[test]
fn api_doc_is_current_and_complete() {
    let (md, missing) = sevplace_proto::doc::markdown(sevplace_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes");
    assert!(
        missing.0.is_empty(),
        "proto elements without a comment: {:?}",
        missing.0
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md");
    if std::env::var_os("SEVPLACE_BLESS").is_some() {
        std::fs::write(&path, &md).expect("write docs/api.md");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == md,
        "docs/api.md is out of date: run SEVPLACE_BLESS=1 cargo test -p sevplace-proto --test api_doc"
    );
}

#[test]
fn package_is_versioned_and_each_rpc_has_its_own_messages() {
    use prost::Message;
    let fds = prost_types::FileDescriptorSet::decode(sevplace_proto::FILE_DESCRIPTOR_SET).unwrap();
    let file = fds
        .file
        .iter()
        .find(|f| f.package() == "sevplace.v1")
        .expect("sevplace.v1");
    let svc = &file.service[0];
    let mut seen = std::collections::BTreeSet::new();
    for m in &svc.method {
        let req = format!(".sevplace.v1.{}Request", m.name());
        let resp = format!(".sevplace.v1.{}Response", m.name());
        assert_eq!(m.input_type(), req);
        assert_eq!(m.output_type(), resp);
        assert!(seen.insert(req) && seen.insert(resp));
    }
    let names: Vec<&str> = svc.method.iter().map(|m| m.name()).collect();
    assert_eq!(
        names,
        [
            "GetHost",
            "PlaceVm",
            "ReleaseVm",
            "GetVm",
            "ListVms",
            "ScrubVm",
            "WatchEvents"
        ]
    );
}
