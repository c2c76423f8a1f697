use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write_file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn embedded_defaults() {
    let missing = Path::new("/nonexistent/sevplaced.toml");
    // An explicit file must exist.
    assert!(matches!(
        load(Some(missing), &[], &FlagOverrides::default()),
        Err(ConfigError::File { .. })
    ));
    let f = write_file("");
    let s = load(Some(f.path()), &[], &FlagOverrides::default()).unwrap();
    assert_eq!(s.socket, default_socket());
    assert_eq!(s.socket_mode, 0o660);
    assert_eq!(s.metrics_addr, Some("127.0.0.1:9478".parse().unwrap()));
    assert_eq!(s.listen_tcp, None);
    assert_eq!(s.host_root, PathBuf::from("/"));
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/sevplace"));
    assert_eq!(s.reconcile_period_ms, 2000);
    assert_eq!(s.log_format, LogFormat::Text);
    assert!(s.reserved_cpus.is_empty());
    assert_eq!(s.host_path("/sys"), PathBuf::from("/sys"));
}

#[test]
fn precedence_file_then_env_then_flag() {
    let f = write_file(
        "[server]\nsocket = \"/file.sock\"\n[metrics]\naddr = \"127.0.0.1:1\"\n[reconcile]\nperiod_ms = 500\n[placement]\nreserved_cpus = \"0-1\"\n",
    );
    let flags = FlagOverrides::default();
    let s = load(Some(f.path()), &[], &flags).unwrap();
    assert_eq!(s.socket, PathBuf::from("/file.sock"));
    assert_eq!(s.metrics_addr, Some("127.0.0.1:1".parse().unwrap()));
    assert_eq!(s.reconcile_period_ms, 500);
    assert_eq!(s.reserved_cpus.to_string(), "0-1");

    let e = env(&[
        ("SEVPLACE__SERVER__SOCKET", "/env.sock"),
        ("SEVPLACE__RECONCILE__PERIOD_MS", "700"),
        ("SEVPLACE__PLACEMENT__RESERVED_CPUS", "0"),
        ("UNRELATED", "x"),
    ]);
    let s = load(Some(f.path()), &e, &flags).unwrap();
    assert_eq!(s.socket, PathBuf::from("/env.sock"));
    assert_eq!(s.reconcile_period_ms, 700);
    assert_eq!(s.reserved_cpus.to_string(), "0");
    assert_eq!(s.metrics_addr, Some("127.0.0.1:1".parse().unwrap()));

    let flags = FlagOverrides {
        socket: Some("/flag.sock".into()),
        metrics_addr: Some(String::new()),
        log_format: Some("json".into()),
        ..Default::default()
    };
    let s = load(Some(f.path()), &e, &flags).unwrap();
    assert_eq!(s.socket, PathBuf::from("/flag.sock"));
    assert_eq!(s.metrics_addr, None);
    assert_eq!(s.log_format, LogFormat::Json);
    assert_eq!(s.reconcile_period_ms, 700);
}

#[test]
fn unknown_keys_are_named() {
    let f = write_file("[server]\nsockt = \"/x\"\n");
    let err = load(Some(f.path()), &[], &FlagOverrides::default()).unwrap_err();
    assert!(err.to_string().contains("`server.sockt`"), "{err}");

    let f = write_file("[nosuch]\nkey = 1\n");
    let err = load(Some(f.path()), &[], &FlagOverrides::default()).unwrap_err();
    assert!(err.to_string().contains("`nosuch.key`"), "{err}");

    let f = write_file("");
    let e = env(&[("SEVPLACE__METRICS__ADR", "x")]);
    let err = load(Some(f.path()), &e, &FlagOverrides::default()).unwrap_err();
    assert!(err.to_string().contains("`metrics.adr`"), "{err}");
    assert!(err.to_string().contains("environment"), "{err}");
}

#[test]
fn bad_values_are_named() {
    let cases = [
        ("[metrics]\naddr = \"localhost\"\n", "metrics.addr"),
        ("[server]\nsocket_mode = \"999\"\n", "server.socket_mode"),
        ("[reconcile]\nperiod_ms = 5\n", "reconcile.period_ms"),
        ("[reconcile]\nperiod_ms = \"soon\"\n", "reconcile.period_ms"),
        (
            "[placement]\nreserved_cpus = \"0-x\"\n",
            "placement.reserved_cpus",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        (
            "[server]\nmax_message_bytes = 10\n",
            "server.max_message_bytes",
        ),
        (
            "[server]\nmax_concurrent_streams = 0\n",
            "server.max_concurrent_streams",
        ),
        (
            "[server]\nrequest_timeout_ms = -1\n",
            "server.request_timeout_ms",
        ),
        (
            "[reconcile]\nauto_place_confidential = \"maybe\"\n",
            "reconcile.auto_place_confidential",
        ),
        ("[host]\nroot = \"relative\"\n", "host.root"),
        ("[server]\nlisten_tcp = \"1.2.3.4\"\n", "server.listen_tcp"),
    ];
    for (text, key) in cases {
        let f = write_file(text);
        let err = load(Some(f.path()), &[], &FlagOverrides::default()).unwrap_err();
        assert!(err.to_string().contains(key), "{text:?}: {err}");
    }
    let f = write_file("this is [not toml");
    assert!(load(Some(f.path()), &[], &FlagOverrides::default()).is_err());
}

#[test]
fn tcp_needs_mutual_tls_or_an_explicit_insecure_tcp() {
    let flags = FlagOverrides {
        listen_tcp: Some("127.0.0.1:9479".into()),
        ..Default::default()
    };
    let f = write_file("");
    let err = load(Some(f.path()), &[], &flags).unwrap_err();
    assert!(matches!(err, ConfigError::TcpNeedsTls { .. }), "{err}");
    for key in [
        "server.listen_tcp",
        "server.tls_cert",
        "server.tls_key",
        "server.tls_client_ca",
        "server.insecure_tcp",
    ] {
        assert!(err.to_string().contains(key), "{key}: {err}");
    }

    // Only the missing keys are named.
    let f = write_file("[server]\ntls_cert = \"/etc/c.pem\"\ntls_key = \"/etc/k.pem\"\n");
    let err = load(Some(f.path()), &[], &flags).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("set server.tls_client_ca ("), "{msg}");

    let f = write_file("[server]\ninsecure_tcp = true\n");
    let s = load(Some(f.path()), &[], &flags).unwrap();
    assert!(s.insecure_tcp);
    assert_eq!(s.tls, None);
    assert_eq!(s.listen_tcp, Some("127.0.0.1:9479".parse().unwrap()));

    let f = write_file("[server]\ninsecure_tcp = true\ntls_cert = \"/etc/c.pem\"\n");
    let err = load(Some(f.path()), &[], &flags).unwrap_err();
    assert!(matches!(err, ConfigError::InsecureWithTls { .. }), "{err}");
    assert!(err.to_string().contains("server.tls_cert"), "{err}");

    let f = write_file(
        "[server]\ntls_cert = \"/etc/c.pem\"\ntls_key = \"/etc/k.pem\"\ntls_client_ca = \"/etc/ca.pem\"\ntls_allowed_clients = [\"Monitor.Example\"]\ntls_admin_clients = [\"orch.example\"]\n",
    );
    let s = load(Some(f.path()), &[], &flags).unwrap();
    let tls = s.tls.unwrap();
    assert_eq!(tls.cert, PathBuf::from("/etc/c.pem"));
    assert_eq!(tls.client_ca, PathBuf::from("/etc/ca.pem"));
    assert_eq!(tls.allowed_clients, ["monitor.example"]);
    assert_eq!(tls.admin_clients, ["orch.example"]);
    assert!(!s.insecure_tcp);

    // A list from the environment is one string of names.
    let e = env(&[(
        "SEVPLACE__SERVER__TLS_ALLOWED_CLIENTS",
        "a.example, B.example c",
    )]);
    let s = load(Some(f.path()), &e, &flags).unwrap();
    assert_eq!(
        s.tls.unwrap().allowed_clients,
        ["a.example", "b.example", "c"]
    );

    // Without listen_tcp nothing is required.
    let f = write_file("[server]\ntls_cert = \"/etc/c.pem\"\n");
    let s = load(Some(f.path()), &[], &FlagOverrides::default()).unwrap();
    assert_eq!(s.tls, None);

    let f = write_file("[server]\ntls_admin_clients = 5\n");
    let err = load(Some(f.path()), &[], &FlagOverrides::default()).unwrap_err();
    assert!(
        err.to_string().contains("server.tls_admin_clients"),
        "{err}"
    );
    let f = write_file("[server]\ninsecure_tcp = \"maybe\"\n");
    let err = load(Some(f.path()), &[], &flags).unwrap_err();
    assert!(err.to_string().contains("server.insecure_tcp"), "{err}");
}

#[test]
fn state_dir_default_follows_the_user() {
    assert_eq!(
        super::default_state_dir(true, &env(&[("HOME", "/home/a")])),
        Some(PathBuf::from("/var/lib/sevplace"))
    );
    assert_eq!(
        super::default_state_dir(false, &env(&[("HOME", "/home/a")])),
        Some(PathBuf::from("/home/a/.local/state/sevplace"))
    );
    assert_eq!(
        super::default_state_dir(
            false,
            &env(&[("HOME", "/home/a"), ("XDG_STATE_HOME", "/xdg")])
        ),
        Some(PathBuf::from("/xdg/sevplace"))
    );
    // A relative XDG_STATE_HOME is ignored, as the XDG spec says.
    assert_eq!(
        super::default_state_dir(
            false,
            &env(&[("HOME", "/home/a"), ("XDG_STATE_HOME", "rel")])
        ),
        Some(PathBuf::from("/home/a/.local/state/sevplace"))
    );
    assert_eq!(super::default_state_dir(false, &[]), None);
}

#[test]
fn log_color_and_octal_mode() {
    use super::LogColor;
    assert!(LogColor::Auto.enabled(true) && !LogColor::Auto.enabled(false));
    assert!(LogColor::Always.enabled(false) && !LogColor::Never.enabled(true));
    let f = write_file("[log]\ncolor = \"never\"\n");
    let s = load(Some(f.path()), &[], &FlagOverrides::default()).expect("valid");
    assert_eq!(s.log_color, LogColor::Never);
    let json = serde_json::to_value(&s).expect("json");
    assert_eq!(json["socket_mode"], "0660");
    let f = write_file("[log]\ncolor = \"sometimes\"\n");
    assert!(load(Some(f.path()), &[], &FlagOverrides::default()).is_err());
}
