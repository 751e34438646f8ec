#!/bin/bash
# Two (or more) "hosts" on one machine for multi-node tests: network namespaces joined by a bridge.
#
#   tools/netns_hosts.sh up   NAME NET N   # hosts NAME-h1..NAME-hN at 10.77.NET.11.., bridge ns NAME-sw
#   tools/netns_hosts.sh run  NAME-h1 CMD...  # run CMD "on" that host: its netns, own hostname, own /etc/hosts
#   tools/netns_hosts.sh down NAME NET N
#
# Addresses exist only inside the namespaces; the main namespace gets a blackhole route for 10.77.NET.0/24
# so nothing can leak out through eth0. Hosts are entered with `nsenter --net` (not `ip netns exec`,
# which remounts /sys). Each host sees a private /etc/hosts (bind mount in a private mount namespace) in
# which every host name resolves to its own address: gloo binds to the address of its hostname.
# Needs root, iproute2 and util-linux.
set -euo pipefail
cmd=${1:?usage: $0 up|run|down ...}; shift
STATE=${NETNS_HOSTS_DIR:-/run/netns-hosts}

case "$cmd" in
up)
  name=${1:?name}; net=${2:?net}; n=${3:-2}
  mkdir -p "$STATE"
  hosts="$STATE/$name.hosts"
  printf '127.0.0.1 localhost\n' > "$hosts"
  ip route add blackhole "10.77.$net.0/24" 2>/dev/null || true
  ip netns add "$name-sw"
  ip -n "$name-sw" link set lo up
  ip -n "$name-sw" link add br0 type bridge
  ip -n "$name-sw" link set br0 up
  for i in $(seq 1 "$n"); do
    h="$name-h$i"; addr="10.77.$net.$((10 + i))"
    ip netns add "$h"
    ip -n "$h" link set lo up
    # veth names are limited to 15 characters and must be unique in the main namespace while created
    a="v${net}x$i$$"; b="s${net}x$i$$"
    ip link add "${a:0:15}" type veth peer name "${b:0:15}"
    ip link set "${a:0:15}" netns "$h"
    ip link set "${b:0:15}" netns "$name-sw"
    ip -n "$name-sw" link set "${b:0:15}" master br0
    ip -n "$name-sw" link set "${b:0:15}" up
    ip -n "$h" link set "${a:0:15}" name eth0
    ip -n "$h" addr add "$addr/24" dev eth0
    ip -n "$h" link set eth0 up
    echo "$addr $h" >> "$hosts"
  done
  ;;
run)
  h=${1:?host}; shift
  name=${h%-h*}
  exec nsenter --net="/run/netns/$h" unshare --uts --mount \
    sh -c 'mount --bind "$0" /etc/hosts; hostname "$1"; shift; exec "$@"' "$STATE/$name.hosts" "$h" "$@"
  ;;
down)
  name=${1:?name}; net=${2:?net}; n=${3:-2}
  for i in $(seq 1 "$n"); do ip netns del "$name-h$i" 2>/dev/null || true; done
  ip netns del "$name-sw" 2>/dev/null || true
  ip route del blackhole "10.77.$net.0/24" 2>/dev/null || true
  rm -f "$STATE/$name.hosts"
  ;;
*) echo "usage: $0 up|run|down ..." >&2; exit 2 ;;
esac
