//! The `colony` command line as a user meets it: check, certs, help, logs.

use std::process::Command;

use colony_tests::colony_bin;

fn colony(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(colony_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run colony")
}

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_every_error_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[cluster]\nname = \"x\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n[[actor]]\nname = \"lb\"\nnode = \"b\"\nkind = \"balancer\"\n\
         [[actor]]\nname = \"lb2\"\nnode = \"a\"\nkind = \"balancer\"\nanti_flap_threshold = 2.0\n",
    )
    .unwrap();
    let out = colony(dir.path(), &["check", config.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stdout.contains("bad.toml:8:8: node 'b' is not defined; the nodes are a"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bad.toml:14:23: anti_flap_threshold must be between 0 and 1, not 2"),
        "{stdout}"
    );
    assert!(stderr.contains("2 errors"), "{stderr}");
}

#[test]
fn certs_init_issue_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = colony(
        dir.path(),
        &["certs", "init", "--dir", d, "--cluster", "lab"],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let again = colony(dir.path(), &["certs", "init", "--dir", d]);
    assert!(!again.status.success());
    assert!(text(&again).1.contains("--force"), "{:?}", text(&again));
    assert!(
        colony(
            dir.path(),
            &["certs", "init", "--dir", d, "--cluster", "lab", "--force"]
        )
        .status
        .success()
    );

    let out = colony(
        dir.path(),
        &["certs", "issue", "edge-1", "--dir", d, "--days", "30"],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let out = colony(
        dir.path(),
        &[
            "certs",
            "show",
            dir.path().join("edge-1.pem").to_str().unwrap(),
        ],
    );
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("DNS:edge-1")
            && stdout.contains("lab Colony CA")
            && stdout.contains("fingerprint"),
        "{stdout}"
    );

    let out = colony(dir.path(), &["certs", "issue", "bad name!", "--dir", d]);
    assert!(!out.status.success());
    let out = colony(dir.path(), &["certs", "show", "/nonexistent.pem"]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("/nonexistent.pem"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn help_documents_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, _) = text(&colony(dir.path(), &["--help"]));
    for sub in ["node", "up", "ctl", "check", "certs"] {
        assert!(stdout.contains(sub), "--help lacks {sub}:\n{stdout}");
    }
    let (stdout, _) = text(&colony(dir.path(), &["ctl", "--help"]));
    for sub in [
        "status",
        "tree",
        "send",
        "call",
        "restart",
        "stop",
        "start",
        "kill",
        "reload",
        "reconfigure",
    ] {
        assert!(stdout.contains(sub), "ctl --help lacks {sub}:\n{stdout}");
    }
    let out = colony(dir.path(), &["explode"]);
    assert!(!out.status.success());
}

#[test]
fn json_logs_are_one_object_per_line_with_the_node() {
    let port = colony_tests::free_udp_port();
    let work = colony_tests::Workdir::new(&format!(
        "[cluster]\nname = \"j\"\n[[node]]\nname = \"solo\"\nlisten = \"127.0.0.1:{port}\"\n[[actor]]\nname = \"lb\"\nnode = \"solo\"\nkind = \"balancer\"\n"
    ));
    let log = work.path().join("solo.json.log");
    let mut child = Command::new(colony_bin())
        .args([
            "--log-format",
            "json",
            "node",
            "--config",
            work.config_str(),
            "--name",
            "solo",
        ])
        .current_dir(work.path())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let up = colony_tests::wait_for(std::time::Duration::from_secs(10), || {
        work.status("solo").is_some()
    });
    colony_tests::send_signal(child.id(), libc::SIGTERM);
    let status = child.wait().unwrap();
    assert!(up, "node did not come up");
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 2, "{text}");
    for line in &lines {
        assert!(
            line["level"].is_string() && line["fields"].is_object(),
            "{line}"
        );
    }
    let node_up = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("node up"))
        })
        .expect("node up line");
    assert_eq!(node_up["span"]["node"], "solo", "{node_up}");
}

#[test]
fn plan_estimates_an_example_and_answers_bad_input_clearly() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let out = colony(&examples, &["plan", "gas-detection.toml"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for section in ["FLOWS", "NODES", "CLUSTER LINKS", "COLLECTORS", "OVERHEADS"] {
        assert!(stdout.contains(section), "{section}: {stdout}");
    }
    // Site A's readings cross both bridges to cloud 1.
    assert!(stdout.contains("relay/to-cloud-1"), "{stdout}");

    let out = colony(&examples, &["plan", "no-such.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("cannot read the config"),
        "{:?}",
        text(&out)
    );

    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().to_str().unwrap();
    let out = colony(
        &examples,
        &[
            "plan",
            "demo.toml",
            "--measure",
            "--node",
            "core",
            "--state-dir",
            state_arg,
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("is the node running?"),
        "{:?}",
        text(&out)
    );

    let out = colony(
        &examples,
        &["plan", "demo.toml", "--measure", "--node", "moon"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("no node named 'moon'"),
        "{:?}",
        text(&out)
    );

    let out = colony(&examples, &["plan", "demo.toml", "--seconds", "0"]);
    assert!(!out.status.success());
}
