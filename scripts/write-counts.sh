#!/usr/bin/env bash
# Counts per client write, not only time: for one fio write job of a fixed number of
# writes against tidemark's primary NBD export (replicating to a secondary on loopback),
# the CPU time, page faults, context switches and syscalls (by kind) of the primary and
# the secondary, and the datagrams of each link, divided by the writes fio did. The
# window runs from just before the job to the moment the secondary has applied (and
# the primary has had acknowledged) every write, so work left over after the job counts.
#
#   BINS="base=/path/to/tidemark new=/path/to/tidemark base=... new=..." \
#       JOB=randwrite-4k WRITES=40000 bash scripts/write-counts.sh
#
# Each LABEL=BIN is one sitting with fresh daemons and a fresh work directory, in the
# order given (alternate the binaries: the machine's load drifts). Settings: JOB
# (randwrite-4k or seqwrite-64k), WRITES (per sitting), SIZE (256M), MTU (65000),
# OUT (a directory for the per-sitting JSON; default a temporary one), PERF=1 to
# `perf record` both daemons during the job (OUT/N-LABEL.{primary,secondary}.perf.data; skews the counts).
# Counting is by `perf stat -I` around each daemon (all of its threads, every 250 ms)
# and /proc/PID/stat; CPU time is indicative on a shared machine, the counts are not
# much affected by other load. Needs perf (with syscall tracepoints: run as root), fio,
# python3.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/config.sh"
JOB=${JOB:-randwrite-4k}
WRITES=${WRITES:-40000}
SIZE=${SIZE:-256M}
MTU=${MTU:-65000}
BINS=${BINS:?set BINS="label=/path/to/tidemark ..."}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/write-counts.XXXXXX")}
mkdir -p "$OUT"
case $JOB in
    randwrite-4k) FIO_ARGS=(--rw=randwrite --bs=4k); BS=4096 ;;
    seqwrite-64k) FIO_ARGS=(--rw=write --bs=64k); BS=65536 ;;
    *) echo "JOB is randwrite-4k or seqwrite-64k" >&2; exit 2 ;;
esac
SYSCALLS="read write pwrite64 pwritev pwritev2 recvmmsg recvmsg recvfrom sendmsg sendmmsg sendto fdatasync fsync futex epoll_wait epoll_pwait epoll_pwait2 madvise mmap munmap io_uring_enter sync_file_range fallocate"
EVENTS="task-clock,context-switches,page-faults,raw_syscalls:sys_enter"
for s in $SYSCALLS; do EVENTS="$EVENTS,syscalls:sys_enter_$s"; done
BYTES=$(python3 -c "
s='$SIZE'.upper().rstrip('B').rstrip('I')
m={'K':1<<10,'M':1<<20,'G':1<<30}
print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))")

free_port() {
    python3 -c 'import socket,sys; s=socket.socket(type=socket.SOCK_DGRAM if sys.argv[1]=="u" else socket.SOCK_STREAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"
}

PERFS=()
WORK=""
cleanup() {
    local rc=$?
    stop_daemons
    [ -n "$WORK" ] && rm -rf "$WORK"
    exit $rc
}
# Stops the daemons (each the child of its perf stat), newest first; perf then writes
# its last interval and exits.
stop_daemons() {
    local i child
    for ((i = ${#PERFS[@]} - 1; i >= 0; i--)); do
        child=$(cat "/proc/${PERFS[i]}/task/${PERFS[i]}/children" 2>/dev/null || true)
        for c in $child; do kill -TERM "$c" 2>/dev/null || true; done
        for _ in $(seq 100); do kill -0 "${PERFS[i]}" 2>/dev/null || break; sleep 0.1; done
        kill -TERM "${PERFS[i]}" 2>/dev/null || true
        wait "${PERFS[i]}" 2>/dev/null || true
    done
    PERFS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The pid of the tidemark process under perf stat $1 (bounded wait).
child_of() {
    for _ in $(seq 100); do
        c=$(cat "/proc/$1/task/$1/children" 2>/dev/null || true)
        [ -n "$c" ] && { echo "${c%% *}"; return 0; }
        sleep 0.05
    done
    return 1
}

# /proc figures of a pid as JSON: utime+stime ticks, minor and major faults.
proc_stat() {
    python3 - "$1" <<'PY'
import json, os, sys
pid = sys.argv[1]
f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
print(json.dumps({"minflt": int(f[7]), "majflt": int(f[9]),
                  "ticks": int(f[11]) + int(f[12]), "hz": os.sysconf("SC_CLK_TCK"),
                  "threads": int(f[17])}))
PY
}

# Waits (up to 120 s) until the secondary applied and the primary had acknowledged
# everything the primary wrote; prints the primary's and the secondary's status.
settle() {
    python3 - "$1" "$2" <<'PY'
import json, sys, time
def rd(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
def s(st, k):
    return sum(x.get(k, 0) for x in st["stats"]["pairs"])
end = time.time() + 120
t0 = time.time()
while time.time() < end:
    p, q = rd(sys.argv[1]), rd(sys.argv[2])
    # status.json is rewritten every 500 ms: wait for one written after we started.
    if p and q and time.time() - t0 > 0.6 and s(p, "written_seq") > 0 \
            and s(p, "acked_seq") >= s(p, "written_seq") \
            and s(q, "applied_seq") >= s(p, "written_seq"):
        print(json.dumps({"primary": p, "secondary": q}))
        sys.exit(0)
    time.sleep(0.05)
sys.exit("not settled within 120 s")
PY
}

sitting=0
for spec in $BINS; do
    sitting=$((sitting + 1))
    label=${spec%%=*}
    bin=${spec#*=}
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/write-counts-w.XXXXXX")
    NPORT=$(free_port t)
    APORT=$(free_port u)
    BPORT=$(free_port u)
    "$bin" keygen --out "$WORK/cluster.key" >/dev/null
    example_config "$WORK/tidemark.toml" -log data.size="$BYTES" mtu="$MTU" \
        site-a.listen="127.0.0.1:$APORT" site-a.advertise= \
        site-a.nbd_listen="127.0.0.1:$NPORT" \
        site-b.listen="127.0.0.1:$BPORT" site-b.advertise= site-b.nbd_listen=
    T0=$(date +%s.%N)
    perf stat -I 250 -x, -e "$EVENTS" -o "$WORK/perf-secondary.csv" -- \
        "$bin" secondary --config "$WORK/tidemark.toml" >"$WORK/secondary.log" 2>&1 &
    PERFS+=($!)
    SPID=$(child_of "${PERFS[0]}")
    perf stat -I 250 -x, -e "$EVENTS" -o "$WORK/perf-primary.csv" -- \
        "$bin" primary --config "$WORK/tidemark.toml" >"$WORK/primary.log" 2>&1 &
    PERFS+=($!)
    PPID_TM=$(child_of "${PERFS[1]}")
    for _ in $(seq 300); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$NPORT),1)" \
            2>/dev/null && break
        sleep 0.1
    done
    URI="nbd://127.0.0.1:$NPORT/data"
    PSTATUS=$WORK/run/site-a/journal/status.json
    SSTATUS=$WORK/run/site-b/journal/status.json
    fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 \
        --size="$SIZE" --output-format=json --output="$WORK/fill.json" >/dev/null
    settle "$PSTATUS" "$SSTATUS" >"$WORK/before.json"
    [ -n "${INSPECT:-}" ] && $INSPECT "$WORK" fill
    T1=$(date +%s.%N)
    proc_stat "$PPID_TM" >"$WORK/p1.json"
    proc_stat "$SPID" >"$WORK/s1.json"
    if [ "${PERF:-0}" = 1 ]; then
        perf record -F 999 -g -p "$PPID_TM" -o "$OUT/$sitting-$label.primary.perf.data" \
            >/dev/null 2>&1 &
        RECPID=$!
        perf record -F 999 -g -p "$SPID" -o "$OUT/$sitting-$label.secondary.perf.data" \
            >/dev/null 2>&1 &
        RECPID="$RECPID $!"
    fi
    fio --name="$JOB" --ioengine=nbd --uri="$URI" "${FIO_ARGS[@]}" --iodepth=16 \
        --size="$SIZE" --io_size=$((WRITES * BS)) --randrepeat=1 --randseed=42 \
        --output-format=json --output="$WORK/fio.json" >/dev/null
    settle "$PSTATUS" "$SSTATUS" >"$WORK/after.json"
    [ -n "${INSPECT:-}" ] && $INSPECT "$WORK" job
    if [ "${PERF:-0}" = 1 ]; then
        for r in $RECPID; do kill -INT "$r" 2>/dev/null || true; done
        for r in $RECPID; do wait "$r" 2>/dev/null || true; done
    fi
    T2=$(date +%s.%N)
    proc_stat "$PPID_TM" >"$WORK/p2.json"
    proc_stat "$SPID" >"$WORK/s2.json"
    stop_daemons
    python3 - "$WORK" "$OUT/$sitting-$label.json" "$label" "$T0" "$T1" "$T2" "$BS" <<'PY'
import csv, json, sys
work, out, label, t0, t1, t2, bs = sys.argv[1:]
t0, t1, t2, bs = float(t0), float(t1), float(t2), int(bs)
fio = json.load(open(f"{work}/fio.json"))["jobs"][0]["write"]
writes = fio["total_ios"]
def perf(path):
    # Intervals ending after t1 and not later than one interval past t2.
    tot = {}
    for row in csv.reader(l for l in open(path) if l.strip() and not l.startswith("#")):
        try:
            t, v, ev = float(row[0]), row[1], row[3]
        except (ValueError, IndexError):
            continue
        if t0 + t > t1 and t0 + t <= t2 + 0.25:
            try:
                tot[ev] = tot.get(ev, 0.0) + float(v)
            except ValueError:
                pass
    return tot
def proc(a, b):
    a, b = json.load(open(a)), json.load(open(b))
    return {"cpu_s": (b["ticks"] - a["ticks"]) / a["hz"], "minflt": b["minflt"] - a["minflt"],
            "majflt": b["majflt"] - a["majflt"], "threads": [a["threads"], b["threads"]]}
before, after = json.load(open(f"{work}/before.json")), json.load(open(f"{work}/after.json"))
def link(side, k):
    return after[side].get("link", {}).get("counters", {}).get(k, 0) - \
        before[side].get("link", {}).get("counters", {}).get(k, 0)
res = {"label": label, "writes": writes, "iops": fio["iops"], "window_s": t2 - t1}
for side, tag in (("primary", "p"), ("secondary", "s")):
    pr = proc(f"{work}/{tag}1.json", f"{work}/{tag}2.json")
    pf = perf(f"{work}/perf-{side}.csv")
    res[side] = {"proc": pr, "perf": pf,
                 "datagrams_out": link(side, "datagrams_out"),
                 "datagrams_in": link(side, "datagrams_in"),
                 "bytes_out": link(side, "bytes_out")}
json.dump(res, open(out, "w"), indent=1)
gb = writes * bs / 1e9
cpu = res["primary"]["proc"]["cpu_s"] + res["secondary"]["proc"]["cpu_s"]
print(f"{label}: {writes} writes, {fio['iops']:.0f} IOPS, CPU {cpu:.2f} s = {cpu / gb:.1f} s/GB "
      f"(primary {res['primary']['proc']['cpu_s']:.2f}, secondary {res['secondary']['proc']['cpu_s']:.2f})")
for side in ("primary", "secondary"):
    r = res[side]
    pf = r["perf"]
    per = lambda v: v / writes
    calls = {k.split("sys_enter_")[1]: per(v) for k, v in pf.items()
             if "sys_enter_" in k and v > 0}
    print(f"  {side:9} per write: cpu {per(r['proc']['cpu_s']) * 1e6:.1f} us, "
          f"minflt {per(r['proc']['minflt']):.2f}, ctxsw {per(pf.get('context-switches', 0)):.2f}, "
          f"syscalls {per(pf.get('raw_syscalls:sys_enter', 0)):.2f}, "
          f"datagrams out {per(r['datagrams_out']):.3f} in {per(r['datagrams_in']):.3f}; "
          f"threads {r['proc']['threads']}")
    print("    " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(calls.items(), key=lambda x: -x[1])))
PY
    rm -rf "$WORK"
    WORK=""
done
echo "per-sitting JSON: $OUT"
