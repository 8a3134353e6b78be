#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
#
# Drives the kernel's packet generator (/proc/net/pktgen, CONFIG_NET_PKTGEN)
# the way the kernel's samples/pktgen scripts do, for real NICs: UDP to a
# service VIP:PORT, one flow or many (source ports and addresses spread over
# a range), one kernel thread per CPU. Where the module is missing, use
# `xlb pktgen` (XDP live frames) instead; `cargo xtask bench` does.
#
#   xlb-kernel-pktgen.sh -i DEV -d VIP -m NEXT_HOP_MAC [-p PORT] [-f FLOWS]
#                        [-s SIZE] [-t THREADS] [-n COUNT] [-b BURST] [-S SRC]
#
#   -i DEV     interface to send from
#   -d VIP     destination address (IPv4)
#   -m MAC     destination MAC (the node under test, or its gateway)
#   -p PORT    destination UDP port (default 80)
#   -f FLOWS   distinct flows: 1 = one flow; N = source ports 1024…1024+N-1,
#              and source addresses SRC… when N > 32768 (default 1)
#   -s SIZE    packet size without FCS (default 60)
#   -t THREADS kernel threads = CPUs 0…THREADS-1 (default 1)
#   -n COUNT   packets per thread, 0 = until interrupted (default 10000000)
#   -b BURST   packets per skb clone burst (default 32; 1 for a NIC without xmit_more)
#   -S SRC     first source address (default: DEV's first IPv4 address)
#
# Exit status: 0 sent, 2 no pktgen in this kernel, 1 other errors.
set -euo pipefail

PGDEV=/proc/net/pktgen
dev="" vip="" mac="" port=80 flows=1 size=60 threads=1 count=10000000 burst=32 src=""

usage() { sed -n '/^#   xlb-kernel/,/^# Exit/p' "$0" | sed 's/^# \{0,1\}//'; exit 1; }

while getopts "i:d:m:p:f:s:t:n:b:S:h" opt; do
    case $opt in
    i) dev=$OPTARG ;; d) vip=$OPTARG ;; m) mac=$OPTARG ;; p) port=$OPTARG ;;
    f) flows=$OPTARG ;; s) size=$OPTARG ;; t) threads=$OPTARG ;; n) count=$OPTARG ;;
    b) burst=$OPTARG ;; S) src=$OPTARG ;; *) usage ;;
    esac
done
[[ -n $dev && -n $vip && -n $mac ]] || usage

if [[ ! -d $PGDEV ]] && ! modprobe pktgen 2>/dev/null; then
    echo "error: this kernel has no pktgen (CONFIG_NET_PKTGEN off, no pktgen module);" >&2
    echo "       send with 'xlb pktgen --dev $dev --dst-mac $mac --dst $vip:$port' (XDP live frames) instead" >&2
    exit 2
fi
[[ -e /sys/class/net/$dev ]] || { echo "error: no interface $dev" >&2; exit 1; }
if [[ -z $src ]]; then
    src=$(ip -4 -o addr show dev "$dev" | awk '{split($4, a, "/"); print a[1]; exit}')
    [[ -n $src ]] || { echo "error: $dev has no IPv4 address; give -S" >&2; exit 1; }
fi

# pgset FILE CMD: one pktgen command, checked like samples/pktgen/functions.sh does.
pgset() {
    echo "$2" >"$1"
    if ! grep -q "^Result: OK" "$1"; then
        echo "error: pktgen '$2' on $1: $(grep '^Result' "$1")" >&2
        exit 1
    fi
}

ports=$((flows < 32768 ? flows : 32768))
addrs=$(((flows + 32767) / 32768))
last_src=$(python3 -c "import ipaddress,sys; print(ipaddress.ip_address('$src') + $addrs - 1)")

pgset $PGDEV/pgctrl reset
for ((t = 0; t < threads; t++)); do
    thr=$PGDEV/kpktgend_$t
    [[ -e $thr ]] || { echo "error: no pktgen thread for CPU $t" >&2; exit 1; }
    pgset "$thr" rem_device_all
    pgset "$thr" "add_device $dev@$t"
    d=$PGDEV/$dev@$t
    pgset "$d" flag QUEUE_MAP_CPU
    pgset "$d" "count $count"
    pgset "$d" "clone_skb 0"
    pgset "$d" "burst $burst"
    pgset "$d" "pkt_size $((size + 4))" # pktgen counts the FCS
    pgset "$d" "delay 0"
    pgset "$d" "dst $vip"
    pgset "$d" "dst_mac $mac"
    pgset "$d" "udp_dst_min $port"
    pgset "$d" "udp_dst_max $port"
    pgset "$d" "udp_src_min 1024"
    pgset "$d" "udp_src_max $((1024 + ports - 1))"
    pgset "$d" "src_min $src"
    pgset "$d" "src_max $last_src"
    if ((flows > 1)); then
        pgset "$d" flag UDPSRC_RND
        pgset "$d" flag IPSRC_RND
    fi
done

trap 'echo stop >$PGDEV/pgctrl' INT TERM
echo "sending: $threads thread(s), $flows flow(s), $size-byte frames to $vip:$port via $dev" >&2
echo start >$PGDEV/pgctrl
for ((t = 0; t < threads; t++)); do
    grep -A2 "^Result" "$PGDEV/$dev@$t"
done
