#!/usr/bin/env bash
# The soak (docs/testing.md, "Soak"): one primary and two secondary processes through
# wan-sims with 2 % loss, dependent NBD writes and fio verify traffic, while secondaries
# are SIGKILLed (alone and together, then promoted on a copy: must be a cut), links cut
# for 1-30 s and the primary restarted. Every epoch (150 s) ends converged with
# remote == local for every pair.
#
#   bash scripts/soak.sh [MINUTES]     # default 30
#
# TIDEMARK_SEED=N replays a fault schedule; the samples (RSS, journal bytes, lag per
# system every 2 s) go to $TIDEMARK_SOAK_OUT (default target/soak)/soak-SEED.csv and
# are summarised at the end. Needs fio.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-30}
export TIDEMARK_SOAK_MINUTES=$MINUTES
export TIDEMARK_SOAK_OUT=${TIDEMARK_SOAK_OUT:-${CARGO_TARGET_DIR:-$PWD/target}/soak}
mkdir -p "$TIDEMARK_SOAK_OUT"
echo "soak: $MINUTES minutes, samples in $TIDEMARK_SOAK_OUT ($(date -u +%FT%TZ))"
cargo test --release -p tidemark-cli --test soak -- --ignored --nocapture 2>&1 \
  | tee "$TIDEMARK_SOAK_OUT/soak-$(date -u +%Y%m%dT%H%M%S).log"
status=${PIPESTATUS[0]}
# The samples, per system: maximum RSS and journal bytes per quarter of the run.
csv=$(ls -t "$TIDEMARK_SOAK_OUT"/soak-*.csv 2>/dev/null | head -1 || true)
if [ -n "$csv" ]; then
  python3 - "$csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if not rows:
    sys.exit(0)
end = max(float(r["t_s"]) for r in rows) or 1.0
print(f"{'system':<8} {'quarter':>7} {'RSS max MiB':>12} {'journal max MiB':>16} {'lag p99 max ms':>15}")
for s in sorted({r["system"] for r in rows}):
    for q in range(4):
        sel = [r for r in rows if r["system"] == s and q * end / 4 <= float(r["t_s"]) <= (q + 1) * end / 4]
        if not sel:
            continue
        rss = max(int(r["rss_kib"]) for r in sel) / 1024
        jb = max(int(r["journal_bytes"]) for r in sel) / 1048576
        lag = max(int(r["lag_p99_us"]) for r in sel) / 1000
        print(f"{s:<8} {q + 1:>7} {rss:>12.1f} {jb:>16.1f} {lag:>15.1f}")
PY
fi
exit "$status"
