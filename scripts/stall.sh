#!/usr/bin/env bash
# The reproduction of issue 9 (replication stopping for good under ordinary load), run
# N times per case. Each run starts a primary and a secondary on 127.0.0.1 (a fresh
# state each time), runs one fio job through the primary's NBD export, and counts as
# complete only if fio finishes without an error AND the secondary then applies every
# write the primary stamped (written == acked == applied) within DEADLINE seconds.
#
#   bash scripts/stall.sh [N]          # default N=10; prints "case: K of N complete"
#
# The config is examples/tidemark.toml with one pair ("data", 1 GiB) and other ports.
# Cases (every setting not named is the default: mtu 1400, window 64 MiB):
#   j64-seq     journal_size 64MiB, fio --rw=write --bs=64k --iodepth=16 --runtime=RUNTIME
#   j256-seq    the default 256MiB journal, the same job
#   relay-rand  the default journal, every datagram through a relay that delays it 1 ms,
#               fio --rw=randwrite --bs=4k --iodepth=16 --runtime=RUNTIME
# CASES="j64-seq relay-rand" picks some; RUNTIME (default 8) sets fio's runtime;
# PORT (default 17300) moves the ports; KEEP=1 keeps the run directories.
# Needs: fio, python3, cargo. Exit status 1 if any run did not complete.
set -euo pipefail
N=${1:-10}
RUNTIME=${RUNTIME:-8}
DEADLINE=${DEADLINE:-60}
CASES=${CASES:-"j64-seq j256-seq relay-rand"}
A=${PORT:-17300}; B=$((A + 100)); NBD=$((A + 200)); RELAY=$((A + 1))
for p in fio python3; do
    command -v "$p" >/dev/null || { echo "missing $p (apt-get install -y fio python3)" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
. scripts/config.sh   # example_config: examples/tidemark.toml with a few values changed
cargo build --release --bin tidemark >/dev/null 2>&1
T=${CARGO_TARGET_DIR:-$PWD/target}/release/tidemark
ROOT=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] && echo "runs kept in $ROOT" || rm -rf "$ROOT"
}
trap cleanup EXIT

config() { # $1 dir, $2 journal size, $3 port site-b is reached at, $4 port site-a is reached at
    example_config "$1/tm.toml" -log data.size=1GiB \
        site-a.listen="127.0.0.1:$A" site-a.advertise="127.0.0.1:$4" site-a.journal_size="$2" \
        site-a.nbd_listen="127.0.0.1:$NBD" \
        site-b.listen="127.0.0.1:$B" site-b.advertise="127.0.0.1:$3" site-b.nbd_listen=
}

# Prints "written acked applied" from the two status files (or nothing yet).
progress() {
    python3 - "$1/run/site-a/journal/status.json" "$1/run/site-b/journal/status.json" <<'PY' 2>/dev/null || true
import json, sys
a, b = (json.load(open(f))["stats"]["pairs"][0] for f in sys.argv[1:])
print(a["written_seq"], a["acked_seq"], b["applied_seq"])
PY
}

# One run; returns 0 if complete. Leaves a line in $ROOT/results.
one() { # $1 case, $2 run number
    local c=$1 dir="$ROOT/$1-$2" journal=256MiB fio_args relay=""
    mkdir -p "$dir"
    (cd "$dir" && "$T" keygen --out cluster.key)
    case $c in
        j64-seq) journal=64MiB; fio_args="--rw=write --bs=64k" ;;
        j256-seq) fio_args="--rw=write --bs=64k" ;;
        relay-rand) fio_args="--rw=randwrite --bs=4k"; relay=1 ;;
        *) echo "unknown case $c" >&2; return 2 ;;
    esac
    if [ -n "$relay" ]; then
        config "$dir" "$journal" "$((B + 1))" "$RELAY"
        "$T" wan-sim --listen "127.0.0.1:$((B + 1))" --forward "127.0.0.1:$B" --delay-ms 1 2>/dev/null & PIDS+=($!)
        "$T" wan-sim --listen "127.0.0.1:$RELAY" --forward "127.0.0.1:$A" --delay-ms 1 2>/dev/null & PIDS+=($!)
    else
        config "$dir" "$journal" "$B" "$A"
    fi
    (cd "$dir" && exec "$T" secondary --config tm.toml 2>secondary.log) & local sec=$!; PIDS+=($sec)
    (cd "$dir" && exec "$T" primary --config tm.toml 2>primary.log) & local pri=$!; PIDS+=($pri)
    local i=0
    until fio --name=probe --ioengine=nbd --uri="nbd://127.0.0.1:$NBD/data" --rw=read --bs=4k \
        --size=4k --output=/dev/null >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -gt 100 ] && { echo "$c #$2: the primary never served NBD" >> "$ROOT/results"; return 1; }
        sleep 0.1
    done
    local ok=1 fio_rc=0
    timeout $((RUNTIME + DEADLINE)) fio --name=job --ioengine=nbd --uri="nbd://127.0.0.1:$NBD/data" \
        $fio_args --iodepth=16 --runtime="$RUNTIME" --time_based --size=1g \
        --output="$dir/fio.txt" >/dev/null 2>&1 || fio_rc=$?
    [ "$fio_rc" = 0 ] || ok=0
    # Then the secondary must catch up: everything stamped acknowledged and applied.
    local p="" t=0
    while [ $t -lt $((DEADLINE * 2)) ]; do
        p=$(progress "$dir")
        set -- $p
        if [ $# = 3 ] && [ "$1" = "$2" ] && [ "$2" = "$3" ] && [ "$1" -gt 0 ]; then break; fi
        sleep 0.5; t=$((t + 1))
    done
    set -- $p
    if ! { [ $# = 3 ] && [ "$1" = "$2" ] && [ "$2" = "$3" ] && [ "$1" -gt 0 ]; }; then ok=0; fi
    # Stopping is bounded too (SIGTERM answers what waits and exits).
    kill -TERM "$pri" "$sec" 2>/dev/null || true
    local w=0
    while kill -0 "$pri" 2>/dev/null || kill -0 "$sec" 2>/dev/null; do
        w=$((w + 1)); [ $w -gt 100 ] && { ok=0; echo "$c #$2: a daemon ignored SIGTERM for 10 s" >> "$ROOT/results"; kill -9 "$pri" "$sec" 2>/dev/null || true; break; }
        sleep 0.1
    done
    wait "$pri" "$sec" 2>/dev/null || true
    for q in "${PIDS[@]}"; do kill -9 "$q" 2>/dev/null || true; wait "$q" 2>/dev/null || true; done
    PIDS=()
    echo "$c #$2: fio rc $fio_rc, written/acked/applied ${p:-none}, $([ $ok = 1 ] && echo complete || echo STALLED)" >> "$ROOT/results"
    [ $ok = 1 ] && [ -z "${KEEP:-}" ] && rm -rf "$dir"
    [ $ok = 1 ]
}

: > "$ROOT/results"
failed=0
echo "$(date -u +%FT%TZ) stall reproduction, $N runs per case, fio runtime ${RUNTIME}s, $(git rev-parse --short HEAD 2>/dev/null)"
for c in $CASES; do
    done_ok=0
    for i in $(seq 1 "$N"); do
        if one "$c" "$i"; then done_ok=$((done_ok + 1)); else failed=1; tail -1 "$ROOT/results"; fi
    done
    echo "$c: $done_ok of $N complete"
done
[ $failed = 0 ]
