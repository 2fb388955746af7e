//! Parsing, validation (with line and column) and diffing of cluster configs.

use std::path::Path;

use colony_config::{
    ClusterConfig, ConfigErrors, FileChecks,
    kinds::{ActorSettings, MqttVersion},
};

const VALID: &str = r#"
[cluster]
name = "gasnet"

[supervision]
strategy = "one_for_all"
max_restarts = 3
within_secs = 5

[[node]]
name = "site-a"
listen = "127.0.0.1:7101"

[[node]]
name = "cloud"
listen = "127.0.0.1:7102"

[[actor]]
name = "broker"
node = "site-a"
kind = "broker"
listen = "127.0.0.1:1883"

[[actor]]
name = "sensors"
node = "site-a"
kind = "sensor_group"
broker = "site-a/broker"
count = 1000
interval_ms = 1000
topic = "outTopic/site-a/{id}"

[[actor]]
name = "uplink"
node = "site-a"
kind = "bridge"
local = "site-a/broker"
remote = "cloud/broker"
topics = [
  { pattern = "outTopic/#", direction = "out", qos = 1 },
  { pattern = "InTopic/#",  direction = "in",  qos = 1 },
]

[[actor]]
name = "broker"
node = "cloud"
kind = "broker"
listen = "127.0.0.1:1884"

[[actor]]
name = "store"
node = "cloud"
kind = "collector"
restart = "transient"
source = { broker = "cloud/broker", topics = ["outTopic/#"] }
database = "data/readings.sqlite"

[[actor]]
name = "lb"
node = "cloud"
kind = "balancer"
weights = { cpu = 0.5, memory = 0.1, bandwidth = 0.2, connections = 0.2 }
"#;

fn parse(src: &str) -> Result<ClusterConfig, ConfigErrors> {
    ClusterConfig::from_toml_str(src, "test.toml")
}

/// Parses `src`, which must fail, and returns (line, column, message) of every error.
fn errors(src: &str) -> Vec<(usize, usize, String)> {
    let errs = parse(src).expect_err("config should be refused");
    errs.iter()
        .map(|e| (e.line, e.column, e.message.clone()))
        .collect()
}

/// `VALID` with `from` replaced by `to` (which must occur).
fn valid_with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "{from} not in VALID");
    VALID.replacen(from, to, 1)
}

/// 1-based line of the first occurrence of `needle` in `src`.
fn line_of(src: &str, needle: &str) -> usize {
    let at = src.find(needle).expect("needle present");
    src[..at].matches('\n').count() + 1
}

#[test]
fn valid_config_parses_with_defaults() {
    let c = parse(VALID).unwrap();
    assert_eq!(c.cluster.name, "gasnet");
    assert_eq!(c.cluster.heartbeat_ms, 200);
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.actors.len(), 6);
    assert_eq!(
        c.actors_on("site-a")
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["broker", "sensors", "uplink"]
    );
    let ActorSettings::SensorGroup(s) = &c.actors[1].settings else {
        panic!("sensor group expected")
    };
    assert_eq!(s.count, 1000);
    assert_eq!(s.qos, 0);
    let ActorSettings::Balancer(b) = &c.actors[5].settings else {
        panic!("balancer expected")
    };
    assert_eq!(b.anti_flap_threshold, 0.05);
    assert_eq!(b.weights.cpu, 0.5);
}

#[test]
fn valid_config_round_trips() {
    let c = parse(VALID).unwrap();
    let written = c.to_toml();
    let again = parse(&written).unwrap_or_else(|e| panic!("{e}\n---\n{written}"));
    assert_eq!(c, again);
    assert!(c.diff(&again).is_empty());
}

#[test]
fn syntax_error_has_line_and_column() {
    let src = valid_with("count = 1000", "count = = 1000");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, line_of(&src, "count = = 1000"));
    assert!(errs[0].2.starts_with("TOML syntax"), "{:?}", errs[0]);
}

#[test]
fn wrong_type_points_at_the_value() {
    let src = valid_with("count = 1000", "count = \"many\"");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        (errs[0].0, errs[0].1),
        (line_of(&src, "count = \"many\""), 9)
    );
    assert!(errs[0].2.contains("invalid type"), "{errs:?}");
}

#[test]
fn unknown_field_is_refused() {
    let src = valid_with("interval_ms = 1000", "intervall_ms = 1000");
    let errs = errors(&src);
    assert!(
        errs[0].2.contains("unknown field `intervall_ms`"),
        "{errs:?}"
    );
}

#[test]
fn unknown_kind_names_the_kinds() {
    let src = valid_with("kind = \"balancer\"", "kind = \"balancr\"");
    let errs = errors(&src);
    assert_eq!(
        (errs[0].0, errs[0].1),
        (line_of(&src, "kind = \"balancr\""), 8)
    );
    assert!(
        errs[0].2.contains("unknown kind 'balancr'") && errs[0].2.contains("sensor_group"),
        "{errs:?}"
    );
}

#[test]
fn duplicate_node_name() {
    let src = valid_with("name = \"cloud\"", "name = \"site-a\"");
    let errs = errors(&src);
    // The second site-a, plus every actor that still names the now-missing cloud node.
    let dup = errs
        .iter()
        .find(|e| e.2.contains("defined twice"))
        .expect("duplicate reported");
    assert_eq!(
        dup.0,
        line_of(&src, "name = \"site-a\"\nlisten = \"127.0.0.1:7102\"")
    );
    assert_eq!(dup.1, 8);
}

#[test]
fn duplicate_actor_name_per_node() {
    let src = valid_with("name = \"uplink\"", "name = \"sensors\"");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0].0,
        line_of(
            &src,
            "name = \"sensors\"\nnode = \"site-a\"\nkind = \"bridge\""
        )
    );
    assert!(
        errs[0].2.contains("site-a/sensors' is defined twice"),
        "{errs:?}"
    );
}

#[test]
fn same_actor_name_on_two_nodes_is_fine() {
    // "broker" exists on both site-a and cloud in VALID.
    parse(VALID).unwrap();
}

#[test]
fn actor_on_missing_node() {
    let src = valid_with(
        "node = \"cloud\"\nkind = \"balancer\"",
        "node = \"moon\"\nkind = \"balancer\"",
    );
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        (errs[0].0, errs[0].1),
        (line_of(&src, "node = \"moon\""), 8)
    );
    assert_eq!(
        errs[0].2,
        "node 'moon' is not defined; the nodes are cloud, site-a"
    );
}

#[test]
fn reference_to_missing_actor_and_wrong_kind() {
    let src = valid_with("broker = \"site-a/broker\"", "broker = \"site-a/brokr\"");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        (errs[0].0, errs[0].1),
        (line_of(&src, "broker = \"site-a/brokr\""), 10)
    );
    assert_eq!(
        errs[0].2,
        "`broker` refers to site-a/brokr, which is not defined"
    );

    let src = valid_with("remote = \"cloud/broker\"", "remote = \"cloud/lb\"");
    let errs = errors(&src);
    assert_eq!(
        errs[0].2,
        "`remote` must name a broker, but cloud/lb is a balancer"
    );

    let src = valid_with("remote = \"cloud/broker\"", "remote = \"mars/broker\"");
    let errs = errors(&src);
    assert_eq!(
        errs[0].2,
        "`remote` refers to mars/broker, but node 'mars' is not defined"
    );
}

#[test]
fn malformed_address() {
    let src = valid_with("local = \"site-a/broker\"", "local = \"broker\"");
    let errs = errors(&src);
    assert_eq!(errs[0].0, line_of(&src, "local = \"broker\""));
    assert!(errs[0].2.contains("expected node/actor"), "{errs:?}");
}

#[test]
fn listen_address_must_parse_and_not_clash() {
    let src = valid_with(
        "listen = \"127.0.0.1:7102\"",
        "listen = \"127.0.0.1:70000\"",
    );
    let errs = errors(&src);
    assert_eq!(
        (errs[0].0, errs[0].1),
        (line_of(&src, "listen = \"127.0.0.1:70000\""), 10)
    );
    assert!(errs[0].2.contains("socket address"), "{errs:?}");

    let src = valid_with("listen = \"127.0.0.1:1884\"", "listen = \"0.0.0.0:1883\"");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, line_of(&src, "listen = \"0.0.0.0:1883\""));
    assert!(
        errs[0]
            .2
            .contains("tcp address 0.0.0.0:1883 is already used by actor site-a/broker"),
        "{errs:?}"
    );
}

#[test]
fn numbers_in_range() {
    let src = valid_with("count = 1000", "count = 0");
    let errs = errors(&src);
    assert_eq!((errs[0].0, errs[0].1), (line_of(&src, "count = 0"), 9));
    assert_eq!(errs[0].2, "count must be between 1 and 100000, not 0");

    let src = valid_with("cpu = 0.5", "cpu = 1.5");
    let errs = errors(&src);
    assert_eq!(errs[0].2, "cpu must be between 0 and 1, not 1.5");

    let src = valid_with(
        "qos = 1 },\n  { pattern = \"InTopic",
        "qos = 3 },\n  { pattern = \"InTopic",
    );
    let errs = errors(&src);
    assert_eq!(errs[0].2, "qos must be between 0 and 2, not 3");
    assert_eq!(errs[0].0, line_of(&src, "qos = 3"));
}

#[test]
fn bad_topic_filter() {
    let src = valid_with("pattern = \"outTopic/#\"", "pattern = \"outTopic/#/x\"");
    let errs = errors(&src);
    assert_eq!(errs[0].2, "'outTopic/#/x' is not a valid MQTT topic filter");
}

#[test]
fn all_errors_are_reported_at_once() {
    let src = valid_with("count = 1000", "count = 0");
    let src = src.replacen(
        "node = \"cloud\"\nkind = \"balancer\"",
        "node = \"moon\"\nkind = \"balancer\"",
        1,
    );
    let src = src.replacen("broker = \"site-a/broker\"", "broker = \"site-a/brokr\"", 1);
    let errs = errors(&src);
    assert_eq!(errs.len(), 3, "{errs:?}");
    // In file order.
    assert!(errs.windows(2).all(|w| w[0].0 <= w[1].0));
}

#[test]
fn files_named_must_exist_when_checked() {
    let dir = tempfile::tempdir().unwrap();
    let src = valid_with(
        "[cluster]\nname = \"gasnet\"",
        "[cluster]\nname = \"gasnet\"\nca = \"certs/ca.pem\"",
    );
    let err = ClusterConfig::from_toml_str_in(&src, "test.toml", dir.path(), FileChecks::Check)
        .unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    let e = &err.0[0];
    assert_eq!((e.line, e.column), (line_of(&src, "ca = "), 6));
    assert!(
        e.message.contains("certs/ca.pem") && e.message.contains("No such file"),
        "{e}"
    );

    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/ca.pem"), "x").unwrap();
    ClusterConfig::from_toml_str_in(&src, "test.toml", dir.path(), FileChecks::Check).unwrap();
}

#[test]
fn load_reports_unreadable_file() {
    let err =
        ClusterConfig::load(Path::new("/nonexistent/cluster.toml"), FileChecks::Skip).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/nonexistent/cluster.toml: cannot read the config: No such file or directory (os error 2)"
    );
}

#[test]
fn error_display_has_file_line_column() {
    let src = valid_with("count = 1000", "count = 0");
    let err = parse(&src).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "test.toml:{}:9: count must be between 1 and 100000, not 0",
            line_of(&src, "count = 0")
        )
    );
}

#[test]
fn diff_added_removed_changed_unchanged() {
    let old = parse(VALID).unwrap();
    let new_src = VALID
        .replacen("count = 1000", "count = 2000", 1)
        .replacen(
            "[[actor]]\nname = \"lb\"\nnode = \"cloud\"\nkind = \"balancer\"\nweights = { cpu = 0.5, memory = 0.1, bandwidth = 0.2, connections = 0.2 }\n",
            "[[actor]]\nname = \"lb2\"\nnode = \"cloud\"\nkind = \"balancer\"\n",
            1,
        )
        .replacen("restart = \"transient\"\n", "", 1);
    let new = parse(&new_src).unwrap();
    let diff = old.diff(&new);
    assert!(diff.cluster_fields.is_empty());

    let site = &diff.nodes["site-a"];
    assert_eq!(site.changed.len(), 1);
    assert_eq!(site.changed[0].name, "sensors");
    assert_eq!(site.changed[0].fields, ["count"]);
    assert_eq!(site.unchanged, ["broker", "uplink"]);
    assert!(site.added.is_empty() && site.removed.is_empty());

    let cloud = &diff.nodes["cloud"];
    assert_eq!(
        cloud
            .added
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["lb2"]
    );
    assert_eq!(cloud.removed, ["lb"]);
    assert_eq!(cloud.changed.len(), 1);
    assert_eq!(cloud.changed[0].name, "store");
    assert_eq!(cloud.changed[0].fields, ["restart"]);
    assert_eq!(cloud.unchanged, ["broker"]);
}

#[test]
fn diff_kind_change_and_node_changes() {
    let old = parse(VALID).unwrap();
    let new_src = VALID
        .replacen(
            "listen = \"127.0.0.1:7102\"",
            "listen = \"127.0.0.1:7202\"",
            1,
        )
        .replacen("max_restarts = 3", "max_restarts = 4", 1)
        + "\n[[node]]\nname = \"site-b\"\n";
    let new = parse(&new_src).unwrap();
    let diff = old.diff(&new);
    assert_eq!(diff.cluster_fields, ["supervision.max_restarts"]);
    assert_eq!(diff.nodes["cloud"].node_fields, ["listen", "supervision"]);
    assert!(diff.nodes["site-b"].node_added);
    assert!(
        diff.nodes["site-a"]
            .node_fields
            .contains(&"supervision".to_owned())
    );
}

#[test]
fn bridge_settings_are_checked() {
    // An external remote: bad URL, a wildcard in a prefix, mqtts without a CA, a certificate
    // without its key, a password without a user.
    let src = valid_with(
        "remote = \"cloud/broker\"",
        "remote = \"mqtts://broker.example:99999\"\nfailover = [\"http://x\"]\ncert = \"c.pem\"\npassword = \"pw\"",
    )
    .replacen("{ pattern = \"InTopic/#\",  direction = \"in\",  qos = 1 }", "{ pattern = \"InTopic/#\", direction = \"in\", local_prefix = \"a/+/\" }", 1);
    let messages: Vec<String> = errors(&src).into_iter().map(|e| e.2).collect();
    for want in [
        "'mqtts://broker.example:99999': the port must be a number from 1 to 65535",
        "'http://x' must start with mqtt:// or mqtts://",
        "an mqtts:// remote needs `ca` (the CA certificate, PEM)",
        "a client certificate needs both `cert` and `key`",
        "`password` needs `username`",
        "`local_prefix` 'a/+/' must not hold wildcards",
    ] {
        assert!(messages.iter().any(|m| m == want), "{want}: {messages:?}");
    }

    // Settings for an external broker make no sense with a Colony remote; nor does bridging a
    // broker to itself.
    let src = valid_with(
        "remote = \"cloud/broker\"",
        "remote = \"site-a/broker\"\nusername = \"u\"\nmqtt_version = \"3.1.1\"",
    );
    let messages: Vec<String> = errors(&src).into_iter().map(|e| e.2).collect();
    assert!(
        messages
            .iter()
            .any(|m| m == "`remote` must be another broker than `local`")
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("`username` is for an external broker"))
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("`mqtt_version` is for an external broker"))
    );

    // The MQTT version is one the bridge speaks.
    let src = valid_with(
        "remote = \"cloud/broker\"",
        "remote = \"mqtt://127.0.0.1:1883\"\nmqtt_version = \"4\"",
    );
    let messages: Vec<String> = errors(&src).into_iter().map(|e| e.2).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("`5`") && m.contains("`3.1.1`")),
        "{messages:?}"
    );

    // Spool bounds and timers.
    let src = valid_with(
        "remote = \"cloud/broker\"",
        "remote = \"cloud/broker\"\nspool_max_messages = 0\nreconnect_min_ms = 500\nreconnect_max_ms = 100\nnotification_topic = \"a/#\"",
    );
    let messages: Vec<String> = errors(&src).into_iter().map(|e| e.2).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("spool_max_messages must be between 1")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m == "reconnect_max_ms must be between 500 and 3600000, not 100"),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("`notification_topic` must be a topic name"))
    );

    // A good external remote parses, with its defaults.
    let src = valid_with(
        "remote = \"cloud/broker\"",
        "remote = \"mqtts://127.0.0.1:8883\"\nfailover = [\"mqtt://[::1]:1883\"]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\nusername = \"u\"\npassword = \"p\"",
    );
    let config = parse(&src).expect("valid");
    let bridge = config
        .actors
        .iter()
        .find_map(|a| match &a.settings {
            ActorSettings::Bridge(b) => Some(b),
            _ => None,
        })
        .unwrap();
    assert_eq!(bridge.failover, ["mqtt://[::1]:1883"]);
    assert_eq!(bridge.spool_max_messages, 1_000_000);
    assert_eq!(bridge.mqtt_version, MqttVersion::V5);
    assert_eq!(
        bridge.notification_topic,
        "colony/bridge/{node}/{name}/state"
    );
}
