#!/usr/bin/env bash
# Colony's broker side by side with Debian's mosquitto on this machine, same load generator
# (actors/examples/mqtt_bench.rs). Prints delivered msgs/s per scenario, p50/p99 latency and the
# ratio Colony/Mosquitto. Needs `mosquitto` installed. Run from the repository root:
#   actors/benches/broker_vs_mosquitto.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin colony -p colony-runtime
cargo build --release -p colony-actors --example mqtt_bench
work=$(mktemp -d)
pids=()
cleanup() { cp "$work/node.log" /tmp/bench-node.log 2>/dev/null || true; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cport=21883; mport=21884
cat >"$work/cluster.toml" <<TOML
[cluster]
name = "bench"
[[node]]
name = "b1"
listen = "127.0.0.1:27999"
[[actor]]
name = "broker"
node = "b1"
kind = "broker"
listen = "127.0.0.1:$cport"
allow_anonymous = true
limits = { max_inflight = 100, max_queued = 100000, max_connections = 100000 }
TOML
cat >"$work/mosquitto.conf" <<CONF
listener $mport 127.0.0.1
allow_anonymous true
max_inflight_messages 100
max_queued_messages 100000
CONF
bin="$PWD/target/release/colony"
(cd "$work" && $bin certs init --config cluster.toml >/dev/null && $bin certs issue --all --config cluster.toml >/dev/null)
ulimit -n 65536 2>/dev/null || true
(cd "$work" && exec $bin node --config cluster.toml --name b1 >node.log 2>&1) & pids+=($!)
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 & pids+=($!)
sleep 1.5
target/release/examples/mqtt_bench "127.0.0.1:$cport" "127.0.0.1:$mport"
