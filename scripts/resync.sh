#!/usr/bin/env bash
# Resync after an outage: how long the primary takes to copy what the secondary missed,
# and what clients see before, during and after the outage. Two daemons on loopback
# from examples/tidemark.toml (other ports, without the "log" pair, the "data" pair at
# DIRTY bytes, NBD on the primary). For each DIRTY size and round, with fresh daemons:
#   1. connected: fio writes DIRTY bytes through NBD while the secondary is up;
#   2. tracking: the secondary is stopped (SIGSTOP), one small write waits out
#      suspend_after_ms, and once the primary tracks fio writes DIRTY bytes again (the
#      whole unit is now dirty);
#   3. resync: the secondary continues (SIGCONT) and a second fio job writes (time
#      based) while the primary resyncs; the resync time runs from the primary's
#      "remote answered: resync" log line to its "resync: complete" line (one clock),
#      and fio is stopped (SIGTERM) once that line appears.
# Each fio job: --rw=randwrite --bs=BS --iodepth=QD over the whole unit, random data.
# Afterwards the remote unit must equal the local one (cmp), or the script fails.
#
#   bash scripts/resync.sh                          # 64MiB 256MiB 1GiB, 1 round each
#   SIZES="16MiB" ROUNDS=1 bash scripts/resync.sh   # a smoke run
#
# Settings (environment): SIZES (default "64MiB 256MiB 1GiB"), ROUNDS (1), BS (64k),
# QD (16), SUSPEND_MS (unset: the default suspend_after_ms, 2000), JOURNAL (unset: the
# example's 256MiB), PORT (17500: UDP ports PORT and PORT+100, NBD PORT+200), KEEP=1
# keeps the directory. Needs fio, python3, cmp, cargo.
set -euo pipefail
SIZES=${SIZES:-"64MiB 256MiB 1GiB"}
ROUNDS=${ROUNDS:-1}
BS=${BS:-64k}
QD=${QD:-16}
A=${PORT:-17500}; B=$((A + 100)); NBD=$((A + 200))
for p in fio python3 cmp; do
  command -v "$p" >/dev/null || { echo "missing $p (apt-get install -y fio python3 diffutils)" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
. scripts/config.sh   # example_config: examples/tidemark.toml with a few values changed
cargo build --release --bin tidemark >/dev/null 2>&1
T=${CARGO_TARGET_DIR:-$PWD/target}/release/tidemark
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
cd "$DIR"
"$T" keygen --out cluster.key
URI="nbd://127.0.0.1:$NBD/data"

# The pair's state, dirty bytes and written/acked points from the primary's status:
# "STATE DIRTY WRITTEN ACKED" (or nothing yet).
pstate() {
  python3 - run/site-a/journal/status.json <<'PY' 2>/dev/null || true
import json, sys
p = json.load(open(sys.argv[1]))["stats"]["pairs"][0]
print(p["primary_state"], p["dirty_bytes"], p["written_seq"], p["acked_seq"])
PY
}

# Waits (bounded: 10 minutes) until `pstate` satisfies the python expression $1 over
# state, dirty, written, acked; fails the script with $2 otherwise.
wait_state() {
  local i=0 s
  while :; do
    s=$(pstate)
    if [ -n "$s" ] && python3 -c "
state, dirty, written, acked = '$s'.split(); dirty, written, acked = int(dirty), int(written), int(acked)
raise SystemExit(0 if ($1) else 1)"; then return 0; fi
    i=$((i + 1)); [ $i -gt 6000 ] && { echo "timed out waiting for: $2 (last: $s)" >&2; exit 1; }
    sleep 0.1
  done
}

# A size as the config writes it ("64MiB") in bytes (fio reads "MiB" as 10^6).
bytes_of() {
  python3 - "$1" <<'PY'
import sys
units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
s = sys.argv[1]
print(next((int(s[:-3]) * m for u, m in units.items() if s.endswith(u)), None) or int(s))
PY
}

# The fio job of the benchmark (on the data export, over a unit of $1): sets FIO, a
# command to which the output file and more arguments are added. (A plain command, not
# a function: started in the background, $! is then fio's own process.)
fio_command() {
  FIO=(fio --name=resync-bench --ioengine=nbd --uri="$URI" --rw=randwrite --bs="$BS"
    --iodepth="$QD" --size="$(bytes_of "$1")" --refill_buffers --output-format=json)
}

# "MB/s p99-ms" of a fio JSON file (its write side).
fio_figures() {
  python3 - "$1" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
w = json.loads(t[t.find("{"):])["jobs"][0]["write"]
p99 = w["clat_ns"]["percentile"].get("99.000000", 0) / 1e6
print(f"{w['bw_bytes'] / 1e6:.0f} {p99:.2f}")
PY
}

printf "%-8s %-5s %9s %11s %10s %8s %9s %8s %9s %8s\n" dirty round "resync s" "resync MB/s" \
  "conn MB/s" "conn p99" "trk MB/s" "trk p99" "rs MB/s" "rs p99"
for size in $SIZES; do
  for r in $(seq 1 "$ROUNDS"); do
    rm -rf run; mkdir -p run
    edits=(site-a.listen="127.0.0.1:$A" site-a.advertise="127.0.0.1:$A"
      site-a.nbd_listen="127.0.0.1:$NBD"
      site-b.listen="127.0.0.1:$B" site-b.advertise="127.0.0.1:$B" site-b.nbd_listen=
      -log data.size="$size")
    [ -n "${JOURNAL:-}" ] && edits+=(site-a.journal_size="$JOURNAL" site-b.journal_size="$JOURNAL")
    example_config tm.toml "${edits[@]}"
    # The tracking settings are not in the example: top-level keys go first.
    if [ -n "${SUSPEND_MS:-}" ]; then
      { echo "suspend_after_ms = $SUSPEND_MS"; cat tm.toml; } > tm.tmp && mv tm.tmp tm.toml
    fi
    RUST_LOG=info "$T" secondary --config tm.toml 2>sec.log & sec=$!; PIDS+=($sec)
    RUST_LOG=info "$T" primary --config tm.toml 2>pri.log & pri=$!; PIDS+=($pri)
    i=0
    until fio --name=probe --ioengine=nbd --uri="$URI" --rw=read --bs=4k --size=4k \
        --output=/dev/null >/dev/null 2>&1; do
      i=$((i + 1)); [ $i -gt 300 ] && { echo "the primary never served NBD" >&2; exit 1; }
      sleep 0.1
    done

    # 1. Connected; then everything acknowledged before the outage.
    fio_command "$size"
    "${FIO[@]}" --output=conn.json >/dev/null
    wait_state 'state == "replicating" and written == acked' "replication before the outage"

    # 2. Tracking: the secondary stops; one write waits out suspend_after_ms.
    kill -STOP "$sec"
    fio --name=prime --ioengine=nbd --uri="$URI" --rw=write --bs=4k --size=4k \
      --output=/dev/null >/dev/null
    wait_state 'state == "tracking"' "tracking"
    "${FIO[@]}" --output=track.json >/dev/null
    wait_state 'state == "tracking" and dirty > 0' "dirty bytes"

    # 3. Resync with a client writing.
    mark=$(wc -l < pri.log)
    kill -CONT "$sec"
    "${FIO[@]}" --output=resync.json --time_based --runtime=3600 >/dev/null 2>&1 & fio=$!
    i=0
    # (grep -c reads to the end: with pipefail, grep -q could make tail die of SIGPIPE.)
    until [ "$(tail -n +"$((mark + 1))" pri.log | grep -v 'regions written since' \
        | grep -c 'resync: complete' || true)" -gt 0 ]; do
      i=$((i + 1)); [ $i -gt 36000 ] && { echo "no resync in an hour" >&2; exit 1; }
      kill -0 "$fio" 2>/dev/null || { echo "the resync-phase fio ended early" >&2; exit 1; }
      sleep 0.1
    done
    # fio ends its jobs on SIGTERM and still writes its report (SIGINT is ignored by
    # background commands of a script).
    kill -TERM "$fio"; wait "$fio" || true
    wait_state 'state == "replicating" and dirty == 0 and written == acked' "replication after the resync"
    kill -TERM "$pri"; wait "$pri" || true
    kill -TERM "$sec"; wait "$sec" || true
    PIDS=()
    cmp run/site-a/data.img run/site-b/data.img || { echo "the remote unit differs from the local" >&2; exit 1; }

    read -r rs_s rs_bytes < <(python3 - pri.log "$mark" <<'PY'
import re, sys
from datetime import datetime
lines = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(sys.argv[1], encoding="utf-8", errors="replace")]
lines = lines[int(sys.argv[2]):]
def at(l):
    return datetime.fromisoformat(l.split()[0].replace("Z", "+00:00"))
begin = next(l for l in lines if "remote answered: resync" in l)
start = next(l for l in lines if "resync: starting" in l)
end = next(l for l in lines if "resync: complete" in l and "regions written since" not in l)
bytes_ = int(re.search(r"bytes=(\d+)", start).group(1))
print(f"{(at(end) - at(begin)).total_seconds():.2f} {bytes_}")
PY
)
    read -r c_bw c_p99 < <(fio_figures conn.json)
    read -r t_bw t_p99 < <(fio_figures track.json)
    read -r r_bw r_p99 < <(fio_figures resync.json)
    rs_mbs=$(python3 -c "print(f'{$rs_bytes / 1e6 / max($rs_s, 0.01):.0f}')")
    printf "%-8s %-5s %9s %11s %10s %8s %9s %8s %9s %8s\n" "$size" "$r" "$rs_s" "$rs_mbs" \
      "$c_bw" "$c_p99" "$t_bw" "$t_p99" "$r_bw" "$r_p99"
  done
done
echo "(resync s: primary's 'remote answered: resync' -> 'resync: complete' (the remote acknowledged"
echo " the last mark); resync MB/s: the resync's planned bytes / resync s; fio: randwrite bs $BS QD $QD"
echo " over the whole unit, MB/s and write p99 completion latency in ms: connected, tracking,"
echo " and during the resync)"
