#!/usr/bin/env bash
# One bridge, three ways, on this machine: Colony to Colony (two nodes, QUIC), Colony to Debian's
# mosquitto (MQTT 5 client), and mosquitto to mosquitto (its own bridge). Same load generator
# (actors/examples/bridge_bench.rs): delivered msgs/s at QoS 0 and 1, latency p50/p99 at
# 1000 msg/s. Needs `mosquitto`. Run from the repository root:
#   actors/benches/bridge_vs_mosquitto.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin colony -p colony-runtime
cargo build --release -p colony-actors --example bridge_bench
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
site=22883; cloud=22884; m1=22885; m2=22886
cat >"$work/cluster.toml" <<TOML
[cluster]
name = "bridgebench"
[[node]]
name = "site"
listen = "127.0.0.1:28001"
[[node]]
name = "cloud"
listen = "127.0.0.1:28002"
[[actor]]
name = "broker"
node = "site"
kind = "broker"
listen = "127.0.0.1:$site"
allow_anonymous = true
limits = { max_inflight = 100, max_queued = 100000 }
[[actor]]
name = "broker"
node = "cloud"
kind = "broker"
listen = "127.0.0.1:$cloud"
allow_anonymous = true
limits = { max_inflight = 100, max_queued = 100000 }
[[actor]]
name = "to-cloud"
node = "site"
kind = "bridge"
local = "site/broker"
remote = "cloud/broker"
topics = [ { pattern = "cc/#", direction = "out", qos = 1 } ]
[[actor]]
name = "to-mosquitto"
node = "site"
kind = "bridge"
local = "site/broker"
remote = "mqtt://127.0.0.1:$m2"
topics = [ { pattern = "cm/#", direction = "out", qos = 1 } ]
TOML
cat >"$work/m2.conf" <<CONF
listener $m2 127.0.0.1
allow_anonymous true
max_inflight_messages 100
max_queued_messages 100000
CONF
cat >"$work/m1.conf" <<CONF
listener $m1 127.0.0.1
allow_anonymous true
max_inflight_messages 100
max_queued_messages 100000
connection m1-to-m2
address 127.0.0.1:$m2
topic mm/# out 1
CONF
bin="$PWD/target/release/colony"
(cd "$work" && $bin certs init --config cluster.toml >/dev/null && $bin certs issue --all --config cluster.toml >/dev/null)
mosquitto -c "$work/m2.conf" >"$work/m2.log" 2>&1 & pids+=($!)
mosquitto -c "$work/m1.conf" >"$work/m1.log" 2>&1 & pids+=($!)
(cd "$work" && exec $bin node --config cluster.toml --name cloud >cloud.log 2>&1) & pids+=($!)
(cd "$work" && exec $bin node --config cluster.toml --name site >site.log 2>&1) & pids+=($!)
sleep 3
target/release/examples/bridge_bench \
  "colony->colony=127.0.0.1:$site,127.0.0.1:$cloud,cc" \
  "colony->mosquitto=127.0.0.1:$site,127.0.0.1:$m2,cm" \
  "mosquitto->mosquitto=127.0.0.1:$m1,127.0.0.1:$m2,mm"
