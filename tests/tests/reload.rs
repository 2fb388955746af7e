//! Hot reconfiguration of a running cluster: a plan first, atomic per node, untouched actors
//! keep running.

use std::time::Duration;

use colony_tests::*;

fn ports() -> [u16; 2] {
    [free_udp_port(), free_udp_port()]
}

fn base(p: [u16; 2]) -> String {
    format!(
        r#"
[cluster]
name = "rl"
heartbeat_ms = 100
heartbeat_misses = 3

[[node]]
name = "alpha"
listen = "127.0.0.1:{}"

[[node]]
name = "beta"
listen = "127.0.0.1:{}"

[[actor]]
name = "steady"
node = "alpha"
kind = "balancer"

[[actor]]
name = "tuned"
node = "alpha"
kind = "balancer"

[[actor]]
name = "retired"
node = "alpha"
kind = "balancer"

[[actor]]
name = "lb"
node = "beta"
kind = "balancer"
"#,
        p[0], p[1]
    )
}

struct Running {
    work: Workdir,
    _nodes: Vec<NodeProc>,
}

fn start(config: &str) -> Running {
    let work = Workdir::new(config);
    let nodes = vec![work.start_node("alpha"), work.start_node("beta")];
    assert!(
        wait_for(Duration::from_secs(20), || work
            .status("alpha")
            .is_some_and(|s| healthy(&s))),
        "cluster never became healthy"
    );
    Running {
        work,
        _nodes: nodes,
    }
}

fn uptime(status: &serde_json::Value, address: &str) -> u64 {
    actor(status, address).unwrap_or_else(|| panic!("{address} missing"))["uptime_ms"]
        .as_u64()
        .unwrap_or(0)
}

/// Writes `config` to a new file and runs `colony ctl reload` with `extra` args.
fn reload(r: &Running, config: &str, extra: &[&str]) -> std::process::Output {
    let path = r.work.path().join("new.toml");
    std::fs::write(&path, config).unwrap();
    let mut args = vec!["reload", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    r.work.ctl("alpha", &args)
}

fn changed(p: [u16; 2]) -> String {
    base(p)
        .replace(
            "name = \"tuned\"\nnode = \"alpha\"\nkind = \"balancer\"",
            "name = \"tuned\"\nnode = \"alpha\"\nkind = \"balancer\"\nanti_flap_threshold = 0.25",
        )
        .replace(
            "name = \"retired\"\nnode = \"alpha\"\nkind = \"balancer\"",
            "name = \"fresh\"\nnode = \"alpha\"\nkind = \"balancer\"",
        )
        .replace(
            "name = \"lb\"\nnode = \"beta\"\nkind = \"balancer\"",
            "name = \"lb\"\nnode = \"beta\"\nkind = \"balancer\"\nrestart = \"transient\"",
        )
}

#[test]
fn a_reload_starts_stops_changes_and_restarts_exactly_what_changed() {
    let p = ports();
    let r = start(&base(p));
    std::thread::sleep(Duration::from_millis(300));
    let before = r.work.status("alpha").unwrap();

    // The dry run shows the plan and changes nothing.
    let out = reload(&r, &changed(p), &["--dry-run", "--json"]);
    assert_success(&out, "reload --dry-run");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alpha = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "alpha")
        .unwrap();
    assert_eq!(alpha["outcome"], "dry_run");
    assert_eq!(alpha["plan"]["start"], serde_json::json!(["fresh"]));
    assert_eq!(alpha["plan"]["stop"], serde_json::json!(["retired"]));
    assert_eq!(
        alpha["plan"]["change_in_place"],
        serde_json::json!(["tuned: anti_flap_threshold"])
    );
    assert_eq!(alpha["plan"]["untouched"], serde_json::json!(["steady"]));
    let beta = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "beta")
        .unwrap();
    assert_eq!(beta["plan"]["restart"], serde_json::json!(["lb: restart"]));
    assert!(actor(&r.work.status("alpha").unwrap(), "alpha/retired").is_some());

    // Applied: the human output names each step per node.
    let out = reload(&r, &changed(p), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_success(&out, &format!("{text}\n"));
    for word in [
        "alpha",
        "applied",
        "start",
        "fresh",
        "retired",
        "tuned",
        "anti_flap_threshold",
        "restart",
    ] {
        assert!(text.contains(word), "reload output lacks {word}:\n{text}");
    }
    let after = r.work.status("beta").unwrap();
    assert!(actor(&after, "alpha/retired").is_none());
    assert_eq!(actor(&after, "alpha/fresh").unwrap()["state"], "running");
    let tuned = actor(&after, "alpha/tuned").unwrap();
    assert_eq!(tuned["settings"]["anti_flap_threshold"], 0.25);
    assert_eq!(tuned["restarts"], 0, "an in-place change does not restart");
    assert!(uptime(&after, "alpha/tuned") > uptime(&before, "alpha/tuned"));
    assert_eq!(actor(&after, "beta/lb").unwrap()["restarts"], 1);
    assert_eq!(actor(&after, "beta/lb").unwrap()["restart"], "transient");
    // Untouched actors keep running with their uptime.
    assert_eq!(actor(&after, "alpha/steady").unwrap()["restarts"], 0);
    assert!(uptime(&after, "alpha/steady") > uptime(&before, "alpha/steady"));

    // The same config again changes nothing.
    let out = reload(&r, &changed(p), &["--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["outcome"] == "no_change"),
        "{report}"
    );
}

#[test]
fn invalid_configs_are_refused_and_nothing_changes() {
    let p = ports();
    let r = start(&base(p));
    let before = r.work.status("alpha").unwrap();
    let syntax = base(p).replace("name = \"steady\"", "name = = \"steady\"");
    let out = reload(&r, &syntax, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("new.toml:") && err.contains("TOML syntax"),
        "{err}"
    );

    let missing = base(p).replace("node = \"beta\"\nkind", "node = \"gamma\"\nkind");
    let out = reload(&r, &missing, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node 'gamma' is not defined"), "{err}");

    let after = r.work.status("alpha").unwrap();
    for a in ["alpha/steady", "alpha/tuned", "alpha/retired", "beta/lb"] {
        assert_eq!(actor(&after, a).unwrap()["restarts"], 0);
        assert!(uptime(&after, a) >= uptime(&before, a));
    }
}

#[test]
fn a_new_actor_that_cannot_start_rolls_its_node_back() {
    let p = ports();
    let r = start(&base(p));
    // Something already sits where the new actor's data directory must go.
    std::fs::write(r.work.path().join(".colony/rl/alpha/fresh"), "in the way").unwrap();
    let out = reload(&r, &changed(p), &["--json"]);
    assert!(!out.status.success(), "a failed reload must exit non-zero");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alpha = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "alpha")
        .unwrap();
    assert_eq!(alpha["outcome"], "rolled_back", "{report}");
    assert!(
        alpha["errors"][0]
            .as_str()
            .unwrap()
            .contains("alpha/fresh failed to start"),
        "{report}"
    );
    // beta's part is its own and was applied.
    let beta = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "beta")
        .unwrap();
    assert_eq!(beta["outcome"], "applied");

    let s = r.work.status("alpha").unwrap();
    assert!(actor(&s, "alpha/fresh").is_none());
    assert_eq!(actor(&s, "alpha/retired").unwrap()["state"], "running");
    assert_eq!(actor(&s, "alpha/steady").unwrap()["state"], "running");
    assert_eq!(
        actor(&s, "alpha/tuned").unwrap()["settings"]["anti_flap_threshold"],
        0.05
    );
}

#[test]
fn messages_keep_flowing_to_untouched_actors_during_a_reload() {
    let p = ports();
    let r = start(&base(p));
    let config = r.work.config_str().to_owned();
    let sender = std::thread::spawn(move || {
        let mut sent = 0;
        for i in 0..60 {
            let msg = format!(
                r#"{{"report": {{"router": "r{i}", "metrics": {{"cpu_percent": 1, "memory_percent": 1, "bandwidth_mbps": 1, "tunnels": 1}}}}}}"#
            );
            let out = std::process::Command::new(colony_bin())
                .args([
                    "ctl",
                    "--config",
                    &config,
                    "--node",
                    "beta",
                    "send",
                    "alpha/steady",
                    &msg,
                ])
                .output()
                .unwrap();
            assert_success(&out, "ctl send");
            sent += 1;
        }
        sent
    });
    for _ in 0..3 {
        let out = reload(&r, &changed(p), &[]);
        assert_success(&out, "reload");
        let out = reload(&r, &base(p), &[]);
        assert_success(&out, "reload");
    }
    let sent = sender.join().unwrap();
    let all_in = wait_for(Duration::from_secs(5), || {
        r.work
            .status("alpha")
            .is_some_and(|s| actor(&s, "alpha/steady").unwrap()["messages_handled"] == sent)
    });
    assert!(
        all_in,
        "{:?}",
        r.work
            .status("alpha")
            .map(|s| actor(&s, "alpha/steady").cloned())
    );
    let s = r.work.status("alpha").unwrap();
    assert_eq!(actor(&s, "alpha/steady").unwrap()["restarts"], 0);
    let routers = r
        .work
        .ctl_json("alpha", &["call", "alpha/steady", r#"{"status": {}}"#]);
    assert_eq!(routers["reply"]["routers"].as_array().unwrap().len(), 60);
}

#[test]
fn reconfigure_changes_one_actor_and_is_remembered() {
    let p = ports();
    let r = start(&base(p));
    let out = r.work.ctl(
        "beta",
        &[
            "reconfigure",
            "alpha/tuned",
            r#"{"anti_flap_threshold": 0.4}"#,
        ],
    );
    assert_success(&out, "ctl");
    let s = r.work.status("alpha").unwrap();
    let tuned = actor(&s, "alpha/tuned").unwrap();
    assert_eq!(tuned["settings"]["anti_flap_threshold"], 0.4);
    assert_eq!(tuned["settings_source"], "reconfigure");
    assert_eq!(tuned["restarts"], 0);

    let out = r.work.ctl(
        "alpha",
        &[
            "reconfigure",
            "alpha/tuned",
            r#"{"anti_flap_threshold": 7}"#,
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("anti_flap_threshold must be between 0 and 1")
    );
    let out = r.work.ctl("alpha", &["reconfigure", "alpha/nobody", "{}"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no actor nobody on node alpha"));

    // A setting the kind cannot take live restarts the actor.
    let out = r.work.ctl(
        "alpha",
        &["reconfigure", "alpha/tuned", r#"{"restart": "transient"}"#],
    );
    assert_success(&out, "ctl");
    assert!(wait_for(Duration::from_secs(5), || r
        .work
        .status("alpha")
        .is_some_and(|s| {
            let a = actor(&s, "alpha/tuned").unwrap();
            a["restarts"] == 1
                && a["state"] == "running"
                && a["settings"]["anti_flap_threshold"] == 0.4
        })));
}

#[test]
fn node_level_changes_are_named_as_needing_a_restart_and_sighup_reloads() {
    let p = ports();
    let r = start(&base(p));
    let moved = base(p).replace(
        &format!("127.0.0.1:{}", p[1]),
        &format!("127.0.0.1:{}", free_udp_port()),
    );
    let out = reload(&r, &moved, &["--dry-run", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let beta = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "beta")
        .unwrap();
    assert_eq!(
        beta["plan"]["needs_node_restart"],
        serde_json::json!(["node.listen"])
    );

    // SIGHUP: a node re-reads the file it was started with.
    std::fs::write(&r.work.config, changed(p)).unwrap();
    r._nodes[0].signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(10), || r
        .work
        .status("alpha")
        .is_some_and(
            |s| actor(&s, "alpha/fresh").is_some_and(|a| a["state"] == "running")
        )));
}
