#!/usr/bin/env bash
# Runs examples/routing.toml in network namespaces on this machine (as root):
#   up      namespaces colony-{e,ra,rb,s} joined by veth pairs, development certificates, and the
#           three nodes started in their namespaces (logs and state in examples/.colony/routing)
#   status  the cluster's status, as the endpoint's node sees it
#   kill N  SIGKILL node N (edge, ra or rb), as a crash would
#   down    stop the nodes and remove the namespaces (and with them every veth and TUN device)
# COLONY names the colony binary (default: the one on PATH, else target/release/colony);
# COLONY_STATE_DIR the state directory (default: examples/.colony/routing).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config="$here/routing.toml"
state="${COLONY_STATE_DIR:-$here/.colony/routing}"
colony="${COLONY:-$(command -v colony || echo "$here/../target/release/colony")}"

veth() { # veth NS_A IF_A ADDR_A NS_B IF_B ADDR_B...
  ip -n "colony-$1" link add "$2" type veth peer name "$5" netns "colony-$4"
  ip -n "colony-$1" addr add "$3" dev "$2"
  ip -n "colony-$1" link set "$2" up
  for a in "${@:6}"; do ip -n "colony-$4" addr add "$a" dev "$5"; done
  ip -n "colony-$4" link set "$5" up
}

up() {
  for n in e ra rb s; do
    ip netns add "colony-$n"
    ip -n "colony-$n" link set lo up
  done
  veth e e-ra 10.200.1.1/24 ra ra-e 10.200.1.2/24
  veth e e-rb 10.200.2.1/24 rb rb-e 10.200.2.2/24
  veth ra ra-s 10.201.1.1/24 s s-ra 10.201.1.2/24
  ip -n colony-ra addr add fd01:1::1/64 dev ra-s nodad
  ip -n colony-s addr add fd01:1::2/64 dev s-ra nodad
  veth rb rb-s 10.201.2.1/24 s s-rb 10.201.2.2/24
  ip -n colony-rb addr add fd01:2::1/64 dev rb-s nodad
  ip -n colony-s addr add fd01:2::2/64 dev s-rb nodad
  # The server: 10.99.0.1 and fd99::1 behind both routers.
  ip -n colony-s addr add 10.99.0.1/32 dev lo
  ip -n colony-s -6 addr add fd99::1/128 dev lo nodad
  ip -n colony-ra route add 10.99.0.0/24 via 10.201.1.2
  ip -n colony-ra -6 route add fd99::/64 via fd01:1::2
  ip -n colony-rb route add 10.99.0.0/24 via 10.201.2.2
  ip -n colony-rb -6 route add fd99::/64 via fd01:2::2
  # Router B reaches the endpoint node's listen address through its own link.
  ip -n colony-rb route add 10.200.1.0/24 via 10.200.2.1
  mkdir -p "$state"
  if [[ ! -f $state/certs/ca.pem ]]; then
    "$colony" certs init --config "$config" --dir "$state/certs"
  fi
  "$colony" certs issue --all --config "$config" --dir "$state/certs"
  for pair in ra:ra rb:rb edge:e; do
    node="${pair%%:*}"
    # `ip netns exec` execs the node, so $! is the node's own pid.
    ip netns exec "colony-${pair##*:}" "$colony" node --config "$config" --name "$node" \
      --state-dir "$state" >"$state/$node.out" 2>&1 &
    echo $! >"$state/$node.pid"
    echo "node $node started in colony-${pair##*:} (pid $!, log $state/$node.out)"
  done
}

status() { ip netns exec colony-e "$colony" ctl --config "$config" --state-dir "$state" --node edge status; }

stop() { # stop NODE [SIGNAL]: signal the node and wait up to 5 s for it to exit
  local pidfile="$state/$1.pid" pid
  [[ -f $pidfile ]] || return 0
  pid="$(cat "$pidfile")"
  rm -f "$pidfile"
  kill "-${2:-TERM}" "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  for node in edge ra rb; do stop "$node"; done
  for n in e ra rb s; do ip netns del "colony-$n" 2>/dev/null || true; done
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  kill) stop "${2:?which node: edge, ra or rb}" KILL ;;
  down) down ;;
  *) echo "usage: $0 up|status|kill NODE|down" >&2; exit 2 ;;
esac
