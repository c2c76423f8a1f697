//! The README's usage, replayed: every `console` block's `$ ` commands run
//! (through `sh`, from the repository root) against a daemon on the
//! fixture host the README names, and their output must equal the lines
//! below them. Only what varies between machines is masked: the host name
//! (`host` line) and the absolute path of the clone (shown as `$PWD`). A
//! `...` line stands for any number of lines. A line the tool prints and
//! the README lacks fails the test, and so does the reverse.

use std::path::{Path, PathBuf};
use std::process::Command;

use sevplace_tests::{bin, Daemon};

/// One `$ command` of a console block and the lines the README shows
/// after it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The steps of every ```console block, in order.
fn console_steps(readme: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut inside = false;
    for line in readme.lines() {
        if !inside {
            inside = line.trim_end() == "```console";
            continue;
        }
        if line.trim_end() == "```" {
            inside = false;
            continue;
        }
        if let Some(cmd) = line.strip_prefix("$ ") {
            steps.push(Step {
                command: cmd.to_string(),
                expected: Vec::new(),
            });
        } else if let Some(step) = steps.last_mut() {
            step.expected.push(line.to_string());
        } else {
            panic!("console block line before any `$ ` command: {line:?}");
        }
    }
    steps
}

/// The fixture after `sevplaced --host-root $PWD/` in the README.
fn fixture_of(readme: &str) -> String {
    let marker = "sevplaced --host-root $PWD/";
    let at = readme
        .find(marker)
        .unwrap_or_else(|| panic!("README names no fixture host ({marker}...)"));
    readme[at + marker.len()..]
        .split(|c: char| c.is_whitespace() || c == '`')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A line with what varies between machines masked.
fn mask(line: &str, root: &str) -> String {
    let line = line.replace(root, "$PWD");
    match line.strip_prefix("host ") {
        Some(rest) => format!(
            "host {}<name>",
            " ".repeat(rest.len() - rest.trim_start().len())
        ),
        None => line.trim_end().to_string(),
    }
}

/// Whether `actual` matches `expected`, `...` standing for any lines.
fn matches(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e == "..." => {
            (0..=actual.len()).any(|skip| matches(rest, &actual[skip..]))
        }
        Some((e, rest)) => actual
            .split_first()
            .is_some_and(|(a, arest)| a == e && matches(rest, arest)),
    }
}

#[test]
fn readme_console_blocks_replay_on_the_fixture_host() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let steps = console_steps(&readme);
    assert!(steps.len() >= 6, "too few console commands: {steps:?}");
    let fixture = fixture_of(&readme);
    let host_root = root.join(&fixture);
    assert!(host_root.join("sys").is_dir(), "{fixture} is not a fixture");
    let d = Daemon::start(&["--host-root", host_root.to_str().expect("utf-8 path")]);

    // `sevplacectl` on PATH, talking to this daemon's socket.
    let path_dir = tempfile::tempdir().expect("tempdir");
    let wrapper = path_dir.path().join("sevplacectl");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' --socket '{}' \"$@\"\n",
            bin("sevplacectl").display(),
            d.socket.display()
        ),
    )
    .expect("write wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .expect("chmod wrapper");
    let path = format!(
        "{}:{}",
        path_dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let root_s = root.display().to_string();
    let mut failures = Vec::new();
    for step in &steps {
        // The README's metrics address is the daemon's default; this one
        // listens on a free port.
        let command = step.command.replace("127.0.0.1:9478", &d.metrics_addr);
        let out = Command::new("sh")
            .arg("-c")
            .arg(&command)
            .current_dir(&root)
            .env("PATH", &path)
            .output()
            .expect("run sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let actual: Vec<String> = stdout.lines().map(|l| mask(l, &root_s)).collect();
        let expected: Vec<String> = step.expected.iter().map(|l| mask(l, &root_s)).collect();
        if !out.status.success() || !matches(&expected, &actual) {
            failures.push(format!(
                "$ {}\n--- README\n{}\n--- tool (exit {:?}, stderr: {})\n{}",
                step.command,
                expected.join("\n"),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim(),
                actual.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "README and tools disagree:\n\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn matching_rules() {
    let v = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert!(matches(&v(&["a", "...", "z"]), &v(&["a", "b", "c", "z"])));
    assert!(matches(&v(&["a", "...", "z"]), &v(&["a", "z"])));
    assert!(!matches(&v(&["a", "z"]), &v(&["a", "b", "z"])));
    assert!(!matches(&v(&["a"]), &v(&["a", "extra line"])));
    assert_eq!(mask("host        vm", "/r"), "host        <name>");
    assert_eq!(mask("cannot read /r/x", "/r"), "cannot read $PWD/x");
    let steps = console_steps("```console\n$ echo hi\nhi\n```\n```sh\n$ not\n```\n");
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].expected, vec!["hi".to_string()]);
}
