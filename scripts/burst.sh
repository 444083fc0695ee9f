#!/usr/bin/env bash
# The burst reproduction of the transport issue, run N times: a plain UDP relay with the
# kernel's default socket receive buffer (rmem_default, 208 KiB here) between the
# systems, as a NAT box or VPN gateway would be; one 1 MiB write at the default
# mtu = 1400 (about 830 datagrams), then a 64 KiB write from the same client. A run is
# complete only if both writes are acknowledged to the client AND the secondary then
# applies both (written == acked == applied == 2 on pair "data") within DEADLINE
# seconds. Before the link paced and recovered parts itself, the relay dropped the
# same tail on every retransmission and the write never arrived (> 110 s).
#
#   bash scripts/burst.sh [N]          # default N=50; prints "K of N complete"
#
# The config is examples/tidemark.toml with one pair ("data", 64 MiB) and other ports.
# DEADLINE (default 30) bounds each wait; PORT (default 17500) moves the ports;
# TIDEMARK_BIN=path runs that binary instead of building this checkout; KEEP=1
# keeps the run directories. Needs: qemu-io (qemu-utils), python3, cargo. Exit status 1
# if any run did not complete.
set -euo pipefail
N=${1:-50}
DEADLINE=${DEADLINE:-30}
A=${PORT:-17500}; B=$((A + 100)); NBD=$((A + 200))
for p in qemu-io python3; do
    command -v "$p" >/dev/null || { echo "missing $p (apt-get install -y qemu-utils python3)" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
. scripts/config.sh   # example_config: examples/tidemark.toml with a few values changed
if [ -z "${TIDEMARK_BIN:-}" ]; then
    cargo build --release --bin tidemark >/dev/null 2>&1
    T=${CARGO_TARGET_DIR:-$PWD/target}/release/tidemark
else
    T=$TIDEMARK_BIN   # a built binary as is (an older build, for a peer run)
fi
ROOT=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] && echo "runs kept in $ROOT" || rm -rf "$ROOT"
}
trap cleanup EXIT

# Prints "written acked applied" of pair "data" from the two status files.
progress() {
    python3 - "$1/run/site-a/journal/status.json" "$1/run/site-b/journal/status.json" <<'PY' 2>/dev/null || true
import json, sys
a, b = (json.load(open(f))["stats"]["pairs"][0] for f in sys.argv[1:])
print(a["written_seq"], a["acked_seq"], b["applied_seq"])
PY
}

one() { # $1 run number; returns 0 if complete
    local dir="$ROOT/run-$1" ok=1
    mkdir -p "$dir"
    (cd "$dir" && "$T" keygen --out cluster.key)
    # Each side is reached through a plain relay (no loss, no delay, default buffers).
    example_config "$dir/tm.toml" -log data.size=64MiB \
        site-a.listen="127.0.0.1:$A" site-a.advertise="127.0.0.1:$((A + 1))" \
        site-a.nbd_listen="127.0.0.1:$NBD" \
        site-b.listen="127.0.0.1:$B" site-b.advertise="127.0.0.1:$((B + 1))" site-b.nbd_listen=
    "$T" wan-sim --listen "127.0.0.1:$((B + 1))" --forward "127.0.0.1:$B" 2>/dev/null & PIDS+=($!)
    "$T" wan-sim --listen "127.0.0.1:$((A + 1))" --forward "127.0.0.1:$A" 2>/dev/null & PIDS+=($!)
    (cd "$dir" && exec "$T" secondary --config tm.toml 2>secondary.log) & local sec=$!; PIDS+=($sec)
    (cd "$dir" && exec "$T" primary --config tm.toml 2>primary.log) & local pri=$!; PIDS+=($pri)
    local i=0
    until qemu-io -f raw -c "read 0 4k" "nbd://127.0.0.1:$NBD/data" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -gt 100 ] && { echo "#$1: the primary never served NBD" >> "$ROOT/results"; return 1; }
        sleep 0.1
    done
    local t0 t1
    t0=$(date +%s.%N)
    timeout "$DEADLINE" qemu-io -f raw -c "write -P 0xa5 0 1M" -c "write -P 0x5a 2M 64k" \
        "nbd://127.0.0.1:$NBD/data" >/dev/null 2>&1 || ok=0
    local p="" w=0
    while [ $w -lt $((DEADLINE * 10)) ]; do
        p=$(progress "$dir")
        [ "$p" = "2 2 2" ] && break
        sleep 0.1; w=$((w + 1))
    done
    t1=$(date +%s.%N)
    [ "$p" = "2 2 2" ] || ok=0
    kill -TERM "$pri" "$sec" 2>/dev/null || true
    wait "$pri" "$sec" 2>/dev/null || true
    for q in "${PIDS[@]}"; do kill -9 "$q" 2>/dev/null || true; wait "$q" 2>/dev/null || true; done
    PIDS=()
    echo "#$1: written/acked/applied ${p:-none} after $(python3 -c "print(f'{$t1 - $t0:.2f}')") s (status polled every 0.5 s), $([ $ok = 1 ] && echo complete || echo STUCK)" >> "$ROOT/results"
    [ $ok = 1 ] && [ -z "${KEEP:-}" ] && rm -rf "$dir"
    [ $ok = 1 ]
}

: > "$ROOT/results"
failed=0 done_ok=0
echo "$(date -u +%FT%TZ) burst reproduction: 1 MiB + 64 KiB through plain relays, $N runs, $(git rev-parse --short HEAD 2>/dev/null)"
for i in $(seq 1 "$N"); do
    if one "$i"; then done_ok=$((done_ok + 1)); else failed=1; tail -1 "$ROOT/results"; fi
done
echo "$done_ok of $N complete"
[ $failed = 0 ]
