#!/usr/bin/env bash
# Colony's broker side by side with Debian's mosquitto on this machine, same load generator
# (actors/examples/mqtt_bench.rs), over plain TCP and over TLS. Prints delivered msgs/s per
# scenario (1, 100, 1000 publishers -> 1 subscriber; 1 publisher -> 100 subscribers; QoS 0 and 1;
# 100-byte payloads), p50/p99 latency at 1,000 msg/s, and the ratio Colony/Mosquitto.
# Needs `mosquitto` and `openssl`. Run from the repository root:
#   actors/benches/broker_vs_mosquitto.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin colony -p colony-runtime
cargo build --release -p colony-actors --example mqtt_bench
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { cp "$work/node.log" /tmp/bench-node.log 2>/dev/null || true; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cport=21883; mport=21884; ctls=21885; mtls=21886

# A throwaway CA and a server certificate for 127.0.0.1, shared by both brokers.
(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
    -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key \
    -out server.csr -subj /CN=server 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
    -days 2 -extfile server.ext 2>/dev/null
  chmod 644 server.key
)

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
listeners = [{ bind = "127.0.0.1:$ctls", tls = { cert = "server.pem", key = "server.key" } }]
allow_anonymous = true
limits = { max_inflight = 100, max_queued = 100000, max_connections = 100000 }
TOML
cat >"$work/mosquitto.conf" <<CONF
allow_anonymous true
max_inflight_messages 100
max_queued_messages 100000
listener $mport 127.0.0.1
listener $mtls 127.0.0.1
certfile $work/server.pem
keyfile $work/server.key
CONF
bin="$PWD/target/release/colony"
(cd "$work" && $bin certs init --config cluster.toml >/dev/null && $bin certs issue --all --config cluster.toml >/dev/null)
ulimit -n 65536 2>/dev/null || true
(cd "$work" && exec $bin node --config cluster.toml --name b1 >node.log 2>&1) & pids+=($!)
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 & pids+=($!)
sleep 1.5
echo "machine: $(nproc) cores, $(uname -r); figures from one run on a shared, loaded machine"
target/release/examples/mqtt_bench --ca "$work/ca.pem" \
  "mqtt://127.0.0.1:$cport" "mqtt://127.0.0.1:$mport" \
  "mqtts://127.0.0.1:$ctls" "mqtts://127.0.0.1:$mtls"
