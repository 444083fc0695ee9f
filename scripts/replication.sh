#!/usr/bin/env bash
# Replication between two tidemark processes on loopback: throughput against writing the
# same workload to plain files, and commit lag (a write's stamp -> applied at the remote),
# clean and through wan-sim (5% loss, 20% reordering). The config is
# examples/tidemark.toml with other ports, 512 MiB journals and two 256 MiB pairs. Run
# from anywhere (it works in the repository root):
#   bash scripts/replication.sh [writes] [depth]
# PORT=N (default 17100) moves the UDP ports (N, N+1, N+100, N+101), so two runs on
# one machine do not clash. TIDEMARK_BIN=path runs that binary as is (an older build,
# for a peer run in the same session); WANSIM_BIN=path runs wan-sim from that binary
# instead (an old link through a new wan-sim, say); CASES picks cases (default: all of
#   clean      loopback, no wan-sim
#   loss5      wan-sim 5 % loss, 20 % reordering
#   wan40      wan-sim 1 % loss, 40 ms delay, 5 ms jitter
#   loss20     wan-sim 20 % loss (liveness: every write must be acknowledged)
#   ret20      wan-sim 20 % loss on the return path only (secondary -> primary:
#              acknowledgements and receipts)
# ). LOAD_TIMEOUT=S gives up on the acknowledgements after S seconds (default 120).
# "resent" is what the link sent again part by part, "retrans" what the units
# retransmitted end to end. Through wan-sim, a second line per case counts datagrams:
# what each wan-sim dropped as configured ("sim-drop") and what the kernel dropped at
# its socket because the receive buffer was full ("kern-drop", /proc/net/udp drops of
# the listening socket), the kernel drops at the two daemons' sockets, and the primary
# link's datagrams deemed lost, losses found spurious (receipted later) and numbers the
# secondary's link received but never receipted.
set -euo pipefail
WRITES=${1:-4000}
DEPTH=${2:-4}
A=${PORT:-17100}; B=$((A + 100))
cd "$(dirname "$0")/.."
. scripts/config.sh   # example_config: examples/tidemark.toml with a few values changed
if [ -z "${TIDEMARK_BIN:-}" ]; then
  cargo build --release --bin tidemark >/dev/null 2>&1
  T=${CARGO_TARGET_DIR:-$PWD/target}/release/tidemark
else
  T=$TIDEMARK_BIN
fi
CASES=${CASES:-"clean loss5 wan40 loss20 ret20"}
DIR=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; if [ -n "${KEEP:-}" ]; then echo "kept $DIR"; else rm -rf "$DIR"; fi; }
trap cleanup EXIT
cd "$DIR"
"$T" keygen --out cluster.key
config() { # $1 = site-a advertise port, $2 = site-b advertise port
  example_config tm.toml \
    site-a.listen="127.0.0.1:$A" site-a.advertise="127.0.0.1:$1" site-a.journal_size=512MiB \
    site-b.listen="127.0.0.1:$B" site-b.advertise="127.0.0.1:$2" site-b.journal_size=512MiB \
    site-a.nbd_listen= site-b.nbd_listen= log.size=256MiB data.size=256MiB
}
run_case() { # $1 = name, $2 = a advertise, $3 = b advertise
  rm -rf run; config "$2" "$3"
  "$T" load --config tm.toml --system site-a --writes "$WRITES" --depth "$DEPTH" --seed 7 --baseline > base.json
  "$T" secondary --config tm.toml 2>sec.log & PIDS+=($!); local sec=$!
  if ! "$T" load --config tm.toml --system site-a --writes "$WRITES" --depth "$DEPTH" --seed 7 ${LOAD_TIMEOUT:+--timeout-s "$LOAD_TIMEOUT"} > load.json 2>load.err; then
    echo "$1: NOT every write was acknowledged: $(tail -1 load.err)"
  fi
  sleep 1.2   # let the secondary write its status once more after the last commit
  DROPS_B=$(udp_drops "$B")   # the primary's socket closed with `load`
  kill -TERM "$sec"; wait "$sec" || true
  python3 - "$1" base.json load.json run/site-b/journal/status.json run/site-a/journal/status.json <<'PY'
import json, sys
name, base, load, status, primary = sys.argv[1:]
b, s = (json.load(open(f)) for f in (base, status))
try:
    l = json.load(open(load))
except Exception:
    sys.exit(0)
try:
    resent = json.load(open(primary))["link"]["counters"].get("items_resent", "-")
except Exception:
    resent = "-"
st = s["stats"]
print(f"{name:<28} {b['mb_per_s']:>8.1f} {l['mb_per_s']:>8.1f} {l['mb_per_s']/b['mb_per_s']:>6.2f}x "
      f"{st['lag_p50_us']/1000:>8.2f} {st['lag_p99_us']/1000:>8.2f} {l['retransmits']:>8} {resent:>8}")
PY
}
udp_drops() { # kernel drops at the UDP socket bound to 127.0.0.1:$1 (/proc/net/udp)
  python3 - "$1" <<'PY'
import sys
port = "0100007F:%04X" % int(sys.argv[1])
n = 0
for line in open("/proc/net/udp").read().splitlines()[1:]:
    f = line.split()
    if f[1] == port:
        n += int(f[-1])
print(n)
PY
}
sims() { # wan-sim arguments for both directions
  sims2 "$*" "$*"
}
sims2() { # $1 = wan-sim arguments towards the secondary, $2 = towards the primary
  # shellcheck disable=SC2086
  "${WANSIM_BIN:-$T}" wan-sim --listen "127.0.0.1:$((B + 1))" --forward "127.0.0.1:$B" --seed 1 $1 2>"$DIR/sim-b.log" & PIDS+=($!)
  # shellcheck disable=SC2086
  "${WANSIM_BIN:-$T}" wan-sim --listen "127.0.0.1:$((A + 1))" --forward "127.0.0.1:$A" --seed 2 $2 2>"$DIR/sim-a.log" & PIDS+=($!)
}
unsims() {
  local kb ka
  kb=$(udp_drops "$((B + 1))"); ka=$(udp_drops "$((A + 1))")
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
  python3 - "$DIR/sim-b.log" "$kb" "$DIR/sim-a.log" "$ka" "$DIR/run/site-a/journal/status.json" "$DIR/run/site-b/journal/status.json" "$DROPS_B" <<'PY'
import json, re, sys
def sim(log):
    m = {}
    for k, v in re.findall(r"(\w+): (\d+)", open(log).read()):
        m[k] = int(v)
    return m
def link(path):
    try:
        return json.load(open(path))["link"]["counters"]
    except Exception:
        return {}
fwd, kfwd, ret, kret, pri, sec, db = sys.argv[1:]
f, r, p, s = sim(fwd), sim(ret), link(pri), link(sec)
def g(m, k):
    return m.get(k, "-")
print(f"  to secondary: wan-sim got {g(f,'received')} sim-drop {g(f,'dropped')} kern-drop {kfwd}"
      f" {('sock-buf ' + str(f['recv_buffer'])) if 'recv_buffer' in f else ''} | daemon kern-drop {db}")
print(f"  to primary:   wan-sim got {g(r,'received')} sim-drop {g(r,'dropped')} kern-drop {kret}")
print(f"  primary link: datagrams out {g(p,'datagrams_out')} lost {g(p,'datagrams_lost')}"
      f" spurious {g(p,'spurious_losses')} items resent {g(p,'items_resent')}"
      f" probe timeouts {g(p,'probe_timeouts')} | secondary never receipted {g(s,'numbers_unreceipted')}")
PY
}
echo "workload: $WRITES writes of 1 B..64 KiB over 2 pairs, $DEPTH chains of dependent writes"
printf "%-28s %8s %8s %7s %8s %8s %8s %8s\n" case "file MB/s" "tm MB/s" ratio "lag p50" "lag p99" retrans resent
for c in $CASES; do
  case $c in
    clean) run_case "loopback, clean" "$A" "$B" ;;
    loss5) sims --loss 0.05 --reorder 0.2; run_case "wan-sim 5% loss 20% reorder" "$((A + 1))" "$((B + 1))"; unsims ;;
    wan40) sims --loss 0.01 --delay-ms 40 --jitter-ms 5; run_case "wan-sim 1% loss 40 ms" "$((A + 1))" "$((B + 1))"; unsims ;;
    loss20) sims --loss 0.2; run_case "wan-sim 20% loss" "$((A + 1))" "$((B + 1))"; unsims ;;
    ret20) sims2 "" "--loss 0.2"; run_case "wan-sim 20% loss returning" "$((A + 1))" "$((B + 1))"; unsims ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
done
echo "(lag in ms: from a write's stamp to its application at the remote, secondary's recent samples)"
