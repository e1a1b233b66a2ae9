#!/usr/bin/env bash
# The NAT scene of tests/e2e/test_nat.py and scripts/demo.sh --nat: machines
# behind home routers, played by Linux network namespaces on this machine.
#
#   scripts/nat-scene.sh check        exit 0 when this machine can play it (root,
#                                     ip netns, nft), else 1 and the reason
#   scripts/nat-scene.sh up PREFIX    build it (removing a stale one first) and
#                                     print its addresses as NAME=VALUE lines
#   scripts/nat-scene.sh down PREFIX  stop what still runs inside and remove it
#
# The scene: a "public" namespace PREFIX-pub, the internet, with a bridge at
# 10.77.0.1/24 (the market and its relay listen there). Then one namespace per
# machine, wired to that bridge by a veth pair:
#   PREFIX-p1, -p2, -p3  providers, each behind its own NAT: a LAN address
#                        10.1.N.2 (where its worker listens and what it
#                        advertises), a WAN address 10.77.0.1N, outgoing
#                        packets sent from the LAN address and masqueraded to
#                        the WAN one (nftables), and every new connection that
#                        comes in from the WAN dropped. Nobody outside can
#                        route to 10.1.N.0/24 at all.
#   PREFIX-r             the renter, behind a NAT of its own (10.1.20.2 /
#                        10.77.0.20)
#   PREFIX-d             a provider with a public address, 10.77.0.14, no NAT
# Nothing here reaches outside these namespaces: the bridge has no uplink.
set -euo pipefail

cmd=${1:-}
prefix=${2:-}

die() {
    echo "nat-scene: $*" >&2
    exit 1
}

check() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces and nftables)"
    command -v ip >/dev/null 2>&1 || die "needs the ip command (Debian: iproute2)"
    command -v nft >/dev/null 2>&1 || die "needs the nft command (Debian: nftables)"
    local probe="arcchk$$"
    ip netns add "$probe" 2>/dev/null || die "cannot create a network namespace here (a container without CAP_SYS_ADMIN?)"
    local ok=1
    ip netns exec "$probe" nft list tables >/dev/null 2>&1 || ok=0
    ip -n "$probe" link add t0 type veth peer name t1 2>/dev/null || ok=0
    ip netns del "$probe"
    [ "$ok" = 1 ] || die "nftables or virtual links do not work inside a network namespace here"
}

namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}-(pub|p1|p2|p3|r|d)$" || true
}

down() {
    local ns pid
    for ns in $(namespaces); do
        # what the scene's user left running inside (its own processes)
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -TERM "$pid" 2>/dev/null || true
        done
    done
    for ns in $(namespaces); do
        for _ in $(seq 50); do
            [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break
            sleep 0.1
        done
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
    done
}

# machine NAME WAN_IP [LAN_IP]: a namespace on the bridge; with a LAN address,
# behind a NAT that lets nothing new in
machine() {
    local name=$1 wan=$2 lan=${3:-} ns="$prefix-$1"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add wan netns "$ns" type veth peer name "v-$name" netns "$prefix-pub"
    ip -n "$prefix-pub" link set "v-$name" master br0 up
    ip -n "$ns" addr add "$wan/24" dev wan
    ip -n "$ns" link set wan up
    if [ -z "$lan" ]; then
        ip -n "$ns" route add default via 10.77.0.1 dev wan
        return
    fi
    # the LAN address on the loopback interface (a machine's own address,
    # which the kernel serves locally; kernels without the dummy link have it)
    ip -n "$ns" addr add "$lan/32" dev lo
    # sent from the LAN address (the bridge's subnet too), rewritten to the
    # WAN one on the way out
    ip -n "$ns" route replace 10.77.0.0/24 dev wan src "$lan"
    ip -n "$ns" route add default via 10.77.0.1 dev wan src "$lan"
    ip netns exec "$ns" nft -f - <<EOF
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
}
table inet firewall {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state new counter drop
    }
}
EOF
}

up() {
    down
    ip netns add "$prefix-pub"
    ip -n "$prefix-pub" link set lo up
    ip -n "$prefix-pub" link add br0 type bridge
    ip -n "$prefix-pub" addr add 10.77.0.1/24 dev br0
    ip -n "$prefix-pub" link set br0 up
    machine p1 10.77.0.11 10.1.1.2
    machine p2 10.77.0.12 10.1.2.2
    machine p3 10.77.0.13 10.1.3.2
    machine r 10.77.0.20 10.1.20.2
    machine d 10.77.0.14
    cat <<EOF
PUB=$prefix-pub
PUBLIC_IP=10.77.0.1
P1=$prefix-p1
P1_LAN=10.1.1.2
P1_WAN=10.77.0.11
P2=$prefix-p2
P2_LAN=10.1.2.2
P2_WAN=10.77.0.12
P3=$prefix-p3
P3_LAN=10.1.3.2
P3_WAN=10.77.0.13
RENTER=$prefix-r
DIRECT=$prefix-d
DIRECT_IP=10.77.0.14
EOF
}

case $cmd in
check) check ;;
up | down)
    [[ "$prefix" =~ ^[a-z][a-z0-9]{0,11}$ ]] || die "PREFIX: 1 to 12 lowercase letters and digits, a letter first"
    check
    if [ "$cmd" = up ]; then
        trap 'rc=$?; [ $rc -ne 0 ] && down; exit $rc' EXIT
        up
        trap - EXIT
    else
        down
    fi
    ;;
*)
    echo "usage: scripts/nat-scene.sh check | up PREFIX | down PREFIX" >&2
    exit 2
    ;;
esac
