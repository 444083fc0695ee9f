#!/usr/bin/env bash
# The same fio jobs, in one session, against
#   (a) qemu-nbd serving a plain raw file (writeback cache), and
#   (b) tidemark's primary NBD export, replicating to a secondary on loopback;
# then a table: MB/s, IOPS, p99 latency, ratio tidemark/qemu-nbd, and the secondary's
# commit lag and backlog during the tidemark write jobs.
#
# Run from anywhere:        bash scripts/nbd-vs-qemu.sh (it works in the repo root)
# Settings (environment):   SIZE=256M RUNTIME=10 RAMP=2 (seconds) ROUNDS=1 (the table
#                           shows the median round; use 3 on a busy machine)
#                           CARGO_TARGET_DIR (default: the workspace's target/), TIDEMARK_BIN
#                           to use a built binary as is, MTU / WINDOW / JOURNAL to
#                           override tidemark's defaults (64MiB / 256MiB for the last
#                           two; MTU defaults to the loopback interface's, less IP and
#                           UDP headers, at most 65000, as an operator would set `mtu`
#                           for the path; MTU=1400 gives tidemark's WAN default),
#                           PRIMARY_JOURNAL=activity-log (or data, the default) sets
#                           `primary_journal`,
#                           OUT (default: nbd-bench-last in the target directory, so
#                           checkouts do not overwrite each other's) keeps the
#                           fio JSON, status samples, logs and perf reports;
#                           PERF=1 to record `perf record --call-graph dwarf` of the
#                           tidemark primary during each tidemark job, KEEP=1 to keep the work directory.
# Needs: qemu-nbd (qemu-utils), fio, python3, cargo.
set -euo pipefail

SIZE=${SIZE:-256M}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
PY="python3 $HERE/nbdbench.py"

cd "$HERE/.."
[ -f Cargo.toml ] && [ -d cli ] || { echo "$HERE/.. is not the tidemark workspace" >&2; exit 2; }
. "$HERE/config.sh"   # example_config: examples/tidemark.toml with a few values changed
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
OUT=${OUT:-$TARGET/nbd-bench-last}
for p in qemu-nbd fio python3; do
    command -v "$p" >/dev/null || { echo "missing $p (apt-get install -y qemu-utils fio)" >&2; exit 2; }
done

if [ -z "${TIDEMARK_BIN:-}" ]; then
    echo "building tidemark (release) in $TARGET ..."
    CARGO_TARGET_DIR=$TARGET cargo build --release --bin tidemark >&2
    TIDEMARK_BIN=$TARGET/release/tidemark
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-nbd-bench.XXXXXX")
RESULTS=$WORK/results
mkdir -p "$RESULTS"
PIDS=()   # the servers, started by this script
AUX=""    # a status watcher or perf recorder running now, started by this script

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in $AUX; do kill -TERM "$pid" 2>/dev/null || true; done
    # Newest first: the primary before the secondary, watchers before both.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
free_udp_port() {
    python3 -c 'import socket; s=socket.socket(type=socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits (bounded) until 127.0.0.1:$1 accepts connections; $2 is the server's pid.
wait_port() {
    for _ in $(seq 300); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null; then
            return 0
        fi
        kill -0 "$2" 2>/dev/null || { echo "server $2 exited before listening on $1" >&2; return 1; }
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

JOBS=${JOBS:-"seqwrite-64k-qd16,randwrite-4k-qd16,randread-4k-qd16"}
job_args() {
    case $1 in
        seqwrite-64k-qd16) echo "--rw=write --bs=64k" ;;
        randwrite-4k-qd16) echo "--rw=randwrite --bs=4k" ;;
        randread-4k-qd16) echo "--rw=randread --bs=4k" ;;
    esac
}

# fio_job SERVER JOB URI PIDS ROUND: one time-based job; JSON to
# $RESULTS/SERVER-JOB-rROUND.json (+ .cpu.json: CPU of the servers PIDS, fio, the rest).
# (The nbd engine has no O_DIRECT: there is no page cache on the client side.)
fio_job() {
    local server=$1 job=$2 uri=$3 pids=$4 round=$5
    local out=$RESULTS/$server-$job-r$round.json
    # Start every job with no dirty pages left by the one before (qemu-nbd's write jobs
    # leave gigabytes that the kernel would otherwise write back during the next job).
    sync
    # shellcheck disable=SC2046
    $PY fio "$out" "$pids" --name="$job" --ioengine=nbd --uri="$uri" $(job_args "$job") \
        --iodepth=16 --numjobs=1 --size="$SIZE" --time_based --runtime="$RUNTIME" \
        --ramp_time="$RAMP" --randrepeat=1 --randseed=42 \
        --output-format=json --output="$out"
    echo "  round $round $server $job: $($PY summary "$out")"
}

# Self time by symbol, then inclusive time of the engine's own frames (runtime and
# inlined frames left out) and time by thread.
perf_summary() {
    echo "== self time (perf report --no-children) =="
    perf report --no-children --sort sym -g none --stdio -i "$1" 2>/dev/null \
        | grep '%' | head -40 || true
    echo "== inclusive time (perf report --children), engine and kernel frames =="
    perf report --children --sort sym -g none --stdio -i "$1" 2>/dev/null | grep '%' \
        | grep -v '(inlined)' | grep -E 'tidemark|chacha|poly1305|seal|journal|sys_|udp_|ext4|memmove|malloc|free' \
        | head -60 || true
    echo "== by thread =="
    perf report --no-children --sort pid -g none --stdio -i "$1" 2>/dev/null | grep '%' | head || true
}

# Fill the image first so reads read data and writes overwrite written blocks.
fill() {
    fio --name=fill --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 \
        --size="$SIZE" --output-format=json --output="$RESULTS/fill-$2.json" >/dev/null
}

if [ -z "${MTU:-}" ]; then
    LO_MTU=$(cat /sys/class/net/lo/mtu 2>/dev/null || echo 1428)
    MTU=$((LO_MTU - 28 > 65000 ? 65000 : LO_MTU - 28))
fi

BYTES=$(python3 -c "
s='$SIZE'.upper().rstrip('B').rstrip('I')
m={'K':1<<10,'M':1<<20,'G':1<<30}
print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))")

echo "work directory $WORK; size $SIZE, $RUNTIME s per job after ${RAMP} s ramp, QD 16"
echo "machine: $(nproc) CPUs, $(uname -r); $(qemu-nbd --version | head -1); $(fio --version)"
echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg); tidemark mtu $MTU, primary_journal ${PRIMARY_JOURNAL:-data}"

# ---------------------------------------------------------------- (a) qemu-nbd
QPORT=$(free_port)
truncate -s "$BYTES" "$WORK/qemu.img"
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$QPORT" --cache=writeback --persistent \
    --shared=4 "$WORK/qemu.img" >"$WORK/qemu-nbd.log" 2>&1 &
QPID=$!
PIDS+=("$QPID")
wait_port "$QPORT" "$QPID"
QURI="nbd://127.0.0.1:$QPORT/bench"
echo "qemu-nbd (pid $QPID) on $QURI"
fill "$QURI" qemu

# ---------------------------------------------------------------- (b) tidemark
NPORT=$(free_port)
APORT=$(free_udp_port)
BPORT=$(free_udp_port)
TM=$WORK/tidemark
mkdir -p "$TM"
"$TIDEMARK_BIN" keygen --out "$TM/cluster.key" >/dev/null
# examples/tidemark.toml with one pair ("data", SIZE) and free ports; advertise is left
# out (it is then listen).
EDITS=(-log data.size="$BYTES" mtu="$MTU"
    site-a.listen="127.0.0.1:$APORT" site-a.advertise= site-a.nbd_listen="127.0.0.1:$NPORT"
    site-b.listen="127.0.0.1:$BPORT" site-b.advertise= site-b.nbd_listen=)
[ -n "${WINDOW:-}" ] && EDITS+=(window="$WINDOW")
[ -n "${JOURNAL:-}" ] && EDITS+=(site-a.journal_size="$JOURNAL" site-b.journal_size="$JOURNAL")
example_config "$TM/tidemark.toml" "${EDITS[@]}"
# A top-level key, so before the first table; left out by default (builds from before
# the key refuse it).
[ -n "${PRIMARY_JOURNAL:-}" ] && sed -i "1i primary_journal = \"$PRIMARY_JOURNAL\"" "$TM/tidemark.toml"

"$TIDEMARK_BIN" secondary --config "$TM/tidemark.toml" >"$WORK/secondary.log" 2>&1 &
SPID=$!
PIDS+=("$SPID")
"$TIDEMARK_BIN" primary --config "$TM/tidemark.toml" >"$WORK/primary.log" 2>&1 &
PPID_TM=$!
PIDS+=("$PPID_TM")
wait_port "$NPORT" "$PPID_TM"
TURI="nbd://127.0.0.1:$NPORT/data"
echo "tidemark primary (pid $PPID_TM) on $TURI, secondary (pid $SPID) on loopback UDP"
PSTATUS=$TM/run/site-a/journal/status.json
SSTATUS=$TM/run/site-b/journal/status.json
fill "$TURI" tidemark
$PY settle "$PSTATUS" "$SSTATUS" "$(date +%s.%N)" 120 "$RESULTS/fill.settle.json"

# ---------------------------------------------------------------- the jobs
# Job by job, qemu-nbd then tidemark, so that load from outside hits both alike.
for round in $(seq "$ROUNDS"); do
    for job in ${JOBS//,/ }; do
        fio_job qemu "$job" "$QURI" "$QPID" "$round"
        stem=$RESULTS/tidemark-$job-r$round
        $PY watch "$PSTATUS" "$SSTATUS" "$stem.watch.json" &
        WPID=$!
        AUX=$WPID
        if [ "${PERF:-0}" = 1 ]; then
            perf record --call-graph dwarf,16384 -F 199 -p "$PPID_TM,$SPID" \
                -o "$WORK/perf-$job-r$round.data" -- sleep $((RUNTIME + RAMP)) >/dev/null 2>&1 &
            PERFPID=$!
            AUX="$WPID $PERFPID"
        fi
        fio_job tidemark "$job" "$TURI" "$PPID_TM,$SPID" "$round"
        ENDED=$(date +%s.%N)
        if [ "${PERF:-0}" = 1 ]; then
            wait "$PERFPID" || true
            perf_summary "$WORK/perf-$job-r$round.data" >"$RESULTS/perf-$job-r$round.txt"
            echo "  perf report: $OUT/perf-$job-r$round.txt"
        fi
        kill -TERM "$WPID"
        wait "$WPID" 2>/dev/null || true
        AUX=""
        case $job in *write*)
            $PY settle "$PSTATUS" "$SSTATUS" "$ENDED" 120 "$stem.settle.json" ;;
        esac
    done
done

$PY table "$RESULTS" "$JOBS" | tee "$RESULTS/table.txt"
rm -rf "$OUT" && mkdir -p "$OUT" && cp -r "$RESULTS"/. "$OUT"/
cp "$WORK"/*.log "$OUT"/ 2>/dev/null || true
echo "fio JSON, replication samples, logs (and perf reports) of this run: $OUT"
