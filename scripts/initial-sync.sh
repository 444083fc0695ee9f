#!/usr/bin/env bash
# Initial sync rate: a primary whose local unit already holds data (a sparse file with
# random extents) copies it to a secondary on loopback, against `cp --sparse=always` of
# the same file on the same machine (then an fsync of the copy: tidemark's copy is
# durable too). The config is examples/tidemark.toml with other ports, without the "log"
# pair and NBD, and the "data" pair at SIZE. Run from anywhere:
#   bash scripts/initial-sync.sh
# Settings (environment): SIZE (default 1GiB, the unit), EXTENT_MIB (8) and STRIDE_MIB
# (16): an extent of random data every STRIDE MiB (512 MiB of data in 1 GiB by default),
# PORT (17300: UDP ports PORT and PORT+100), ROUNDS (1), KEEP=1 keeps the directory.
# The tidemark time runs from the primary's "initial sync: starting" to the secondary's
# applying the sync's last mark (both from their INFO log lines, one clock): every piece
# is then in the remote unit. It also prints the time to the primary's "complete" (the
# remote acknowledged the last mark: every piece durable in its journal).
# Needs python3, GNU cp and cmp.
set -euo pipefail
SIZE=${SIZE:-1GiB}
EXTENT_MIB=${EXTENT_MIB:-8}
STRIDE_MIB=${STRIDE_MIB:-16}
ROUNDS=${ROUNDS:-1}
A=${PORT:-17300}; B=$((A + 100))
cd "$(dirname "$0")/.."
. scripts/config.sh   # example_config: examples/tidemark.toml with a few values changed
cargo build --release --bin tidemark >/dev/null 2>&1
T=${CARGO_TARGET_DIR:-$PWD/target}/release/tidemark
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
cd "$DIR"
"$T" keygen --out cluster.key
example_config tm.toml \
  site-a.listen="127.0.0.1:$A" site-a.advertise="127.0.0.1:$A" site-a.nbd_listen= \
  site-b.listen="127.0.0.1:$B" site-b.advertise="127.0.0.1:$B" site-b.nbd_listen= \
  -log data.size="$SIZE"

# The source: a sparse file of SIZE with EXTENT_MIB MiB of random data every STRIDE_MIB.
python3 - "$SIZE" "$EXTENT_MIB" "$STRIDE_MIB" <<'PY'
import os, sys
units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
s = sys.argv[1]
size = next((int(s[:-3]) * m for u, m in units.items() if s.endswith(u)), None) or int(s)
extent, stride = int(sys.argv[2]) << 20, int(sys.argv[3]) << 20
with open("source.img", "wb") as f:
    f.truncate(size)
    at = 0
    while at + extent <= size:
        f.seek(at)
        f.write(os.urandom(extent))
        at += stride
    f.flush()
    os.fsync(f.fileno())
PY
SRC_ALLOC=$(du -k source.img | cut -f1)
echo "source: $SIZE unit, $((SRC_ALLOC / 1024)) MiB allocated (${EXTENT_MIB} MiB of data every ${STRIDE_MIB} MiB)"

stamp() { python3 -c 'import time; print(time.monotonic())'; }
printf "%-6s %10s %10s %12s %12s %8s\n" round "cp s" "tm s" "tm to ack s" "tm MB/s" ratio
for r in $(seq 1 "$ROUNDS"); do
  rm -rf run copy.img; mkdir -p run/site-a
  cp --sparse=always source.img run/site-a/data.img
  # cp --sparse=always of the same file, and an fsync of the copy.
  t0=$(stamp); cp --sparse=always source.img copy.img; sync copy.img; t1=$(stamp)
  cp_s=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  RUST_LOG=info "$T" secondary --config tm.toml 2>sec.log & PIDS+=($!); sec=$!
  RUST_LOG=info "$T" primary --config tm.toml 2>pri.log & PIDS+=($!); pri=$!
  # Wait (bounded) for the secondary to apply the sync's last mark.
  for _ in $(seq 1 1200); do
    grep -q 'Consistent' sec.log && break
    sleep 0.1
  done
  kill -TERM "$pri"; wait "$pri" || true
  kill -TERM "$sec"; wait "$sec" || true
  read -r tm_s ack_s bytes < <(python3 - pri.log sec.log <<'PY'
import re, sys
from datetime import datetime
def lines(path):
    return [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(path, encoding="utf-8", errors="replace")]
def when(ls, needle):
    for l in ls:
        if needle in l:
            return datetime.fromisoformat(l.split()[0].replace("Z", "+00:00")), l
    sys.exit(f"no line with {needle!r}")
pri, sec = lines(sys.argv[1]), lines(sys.argv[2])
start, line = when(pri, "initial sync: starting")
bytes_ = int(re.search(r"bytes=(\d+)", line).group(1))
acked, _ = when(pri, "initial sync: complete")
applied, _ = when(sec, "Consistent")
print(f"{(applied - start).total_seconds():.2f} {(acked - start).total_seconds():.2f} {bytes_}")
PY
)
  cmp run/site-a/data.img run/site-b/data.img || { echo "the remote unit differs from the local"; exit 1; }
  cmp source.img copy.img >/dev/null
  mbs=$(python3 -c "print(f'{$bytes / 1e6 / $tm_s:.0f}')")
  ratio=$(python3 -c "print(f'{$tm_s / $cp_s:.1f}')")
  printf "%-6s %10s %10s %12s %12s %7sx\n" "$r" "$cp_s" "$tm_s" "$ack_s" "$mbs" "$ratio"
  echo "       copied $((bytes >> 20)) MiB; remote unit $(( $(du -k run/site-b/data.img | cut -f1) / 1024 )) MiB allocated, cp's copy $(( $(du -k copy.img | cut -f1) / 1024 )) MiB"
done
echo "(tm s: primary's sync start -> secondary applied its last piece; ratio: tm s / cp s)"
