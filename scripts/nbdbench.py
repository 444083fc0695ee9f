#!/usr/bin/env python3
"""Helpers for scripts/nbd-vs-qemu.sh: fio JSON summaries, replication sampling from
tidemark's status.json files, and the final table. Standard library only."""

import json
import os
import signal
import sys
import time


def load_fio(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    # fio may print notes before its JSON.
    start = text.find("{")
    if start < 0:
        raise SystemExit(f"{path}: no JSON from fio:\n{text}")
    return json.loads(text[start:])


def fio_summary(path):
    """MB/s, IOPS, p99 completion latency (us) of the job's main direction."""
    job = load_fio(path)["jobs"][0]
    if job.get("error", 0) != 0:
        raise SystemExit(f"{path}: fio job error {job['error']}")
    side = max(("read", "write"), key=lambda d: job[d]["io_bytes"])
    d = job[side]
    pct = d.get("clat_ns", {}).get("percentile", {})
    p99 = pct.get("99.000000", 0) / 1000.0
    return {
        "dir": side,
        "mbps": d["bw_bytes"] / 1e6,
        "iops": d["iops"],
        "p99_us": p99,
        "p50_us": pct.get("50.000000", 0) / 1000.0,
        "ios": d["total_ios"],
    }


def ticks(pid):
    """utime + stime of a process (all threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def machine_ticks():
    """(busy, total) clock ticks of the whole machine."""
    with open("/proc/stat", encoding="utf-8") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return sum(v) - v[3] - v[4], sum(v)


def run_fio(out, pids, fio_args):
    """Runs fio; records the CPU the servers (`pids`, comma-separated), fio itself and
    everything else on the machine used meanwhile, in CPUs (1.0 = one core busy)."""
    import resource
    import subprocess

    pids = [int(p) for p in pids.split(",") if p]
    hz = os.sysconf("SC_CLK_TCK")
    before = [ticks(p) for p in pids]
    busy0, _ = machine_ticks()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    rc = subprocess.call(["fio"] + fio_args, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, _ = machine_ticks()
    each = [ticks(p) - b for p, b in zip(pids, before)]
    server = sum(each)
    fio_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    cpu = {
        "wall_s": wall,
        "server_cpus": server / hz / wall,
        # Per server process, in the order given (tidemark: primary, secondary).
        "each_cpus": [t / hz / wall for t in each],
        "fio_cpus": fio_cpu / wall,
        "other_cpus": max(0.0, (busy1 - busy0 - server) / hz - fio_cpu) / wall,
        "machine_cpus": os.cpu_count(),
    }
    with open(out + ".cpu.json", "w", encoding="utf-8") as f:
        json.dump(cpu, f)
    if rc != 0:
        raise SystemExit(f"fio failed ({rc}); see {out}")


def read_status(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pair_sum(status, field):
    if not status:
        return 0
    return sum(p.get(field, 0) for p in status["stats"]["pairs"])


def watch(primary, secondary, out):
    """Samples both status files every 250 ms until SIGTERM; writes the samples."""
    samples = []
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    t0 = time.time()
    while not stop:
        p, s = read_status(primary), read_status(secondary)
        if p and s:
            samples.append(
                {
                    "t": round(time.time() - t0, 3),
                    "written": pair_sum(p, "written_seq"),
                    "acked": pair_sum(p, "acked_seq"),
                    "applied": pair_sum(s, "applied_seq"),
                    "lag_p50_us": s["stats"].get("lag_p50_us", 0),
                    "lag_p99_us": s["stats"].get("lag_p99_us", 0),
                    # Admission and where the lag goes, per pair (if reported).
                    "admit": [
                        (x.get("unacked_bytes"), x.get("admit_bytes"),
                         x.get("sent_lag_p50_us"), x.get("sent_lag_p99_us"))
                        for x in p["stats"]["pairs"]
                    ],
                    "stages": [x.get("lag_stages", []) for x in s["stats"]["pairs"]],
                }
            )
        time.sleep(0.25)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(samples, f)


def fresh(path, since):
    """The status file's content once it was rewritten after `since` (epoch seconds)."""
    while True:
        try:
            if os.stat(path).st_mtime > since:
                s = read_status(path)
                if s:
                    return s
        except OSError:
            pass
        time.sleep(0.05)


def settle(primary, secondary, since, timeout, out):
    """After a write job ended at `since`: the backlog then (written - applied), the
    commit lag the secondary reports, and how long the secondary took to apply
    everything the primary had written (bounded by `timeout` seconds)."""
    since = float(since)
    p = fresh(primary, since)
    s = fresh(secondary, since)
    written = pair_sum(p, "written_seq")
    first = {
        "written": written,
        "acked": pair_sum(p, "acked_seq"),
        "applied": pair_sum(s, "applied_seq"),
        "lag_p50_us": s["stats"].get("lag_p50_us", 0),
        "lag_p99_us": s["stats"].get("lag_p99_us", 0),
        "lag_samples": s["stats"].get("lag_samples", 0),
        "retransmits": sum(x.get("retransmits", 0) for x in p["stats"]["pairs"]),
        "link_primary": p.get("link"),
        # Where the lag goes (the remote units' ages of writes at each step), if reported.
        "lag_stages": [x.get("lag_stages", []) for x in s["stats"]["pairs"]],
    }
    for x in p["stats"]["pairs"]:
        if "sent_lag_p99_us" in x:
            print(
                f"  primary: age when sent {fmt_us(x['sent_lag_p50_us'])}/"
                f"{fmt_us(x['sent_lag_p99_us'])} (p50/p99)"
            )
    for stages in first["lag_stages"]:
        if stages:
            print(
                "  lag by stage (p50/p99): "
                + ", ".join(
                    f"{x['stage']} {fmt_us(x['p50_us'])}/{fmt_us(x['p99_us'])}"
                    for x in stages
                )
            )
    deadline = time.time() + float(timeout)
    caught = None
    while time.time() < deadline:
        s = read_status(secondary)
        if s and pair_sum(s, "applied_seq") >= written:
            caught = time.time() - since
            break
        time.sleep(0.05)
    first["caught_up_s"] = caught
    first["applied_final"] = pair_sum(read_status(secondary), "applied_seq")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(first, f)
    print(
        f"  backlog at job end {first['written'] - first['applied']} writes; "
        + (
            f"applied everything {caught:.2f} s after the job ended"
            if caught is not None
            else f"NOT caught up within {timeout} s "
            f"({first['applied_final']}/{written} applied)"
        )
    )


def fmt_us(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def runs(results_dir, server, job):
    """Every round of (server, job): (summary, cpu, path stem), ordered by MB/s."""
    out = []
    n = 1
    while True:
        stem = os.path.join(results_dir, f"{server}-{job}-r{n}")
        if not os.path.exists(stem + ".json"):
            break
        cpu = {}
        if os.path.exists(stem + ".json.cpu.json"):
            cpu = json.load(open(stem + ".json.cpu.json", encoding="utf-8"))
        out.append((fio_summary(stem + ".json"), cpu, stem))
        n += 1
    return sorted(out, key=lambda r: r[0]["mbps"])


def table(results_dir, jobs):
    jobs = jobs.split(",")
    rows = []
    nrounds = len(runs(results_dir, "qemu", jobs[0]))
    print()
    print(
        f"Median of {nrounds} round(s) by MB/s; the rounds alternate qemu-nbd and tidemark "
        "job by job.\n'server CPUs': cores the server process(es) used (tidemark: primary "
        "+ secondary); 'CPU s/GB': that per GB moved; 'other CPUs': load from outside "
        "this benchmark (fio excluded) during the job."
    )
    head = (
        f"{'job':<18} {'server':<9} {'MB/s':>8} {'IOPS':>8} {'p99 lat':>9} "
        f"{'x MB/s':>7} {'x p99':>6} {'server CPUs':>11} {'CPU s/GB':>9} {'other CPUs':>10}"
    )
    print(head)
    print("-" * len(head))
    for job in jobs:
        med = {}
        for server in ("qemu", "tidemark"):
            r = runs(results_dir, server, job)
            med[server] = r[len(r) // 2]
        q = med["qemu"][0]
        for server, name in (("qemu", "qemu-nbd"), ("tidemark", "tidemark")):
            r, cpu, _ = med[server]
            ratio = f"{r['mbps'] / q['mbps']:.2f}" if server == "tidemark" else ""
            lat = f"{r['p99_us'] / q['p99_us']:.2f}" if server == "tidemark" and q["p99_us"] else ""
            sc = cpu.get("server_cpus", 0)
            per_gb = sc / (r["mbps"] / 1000) if r["mbps"] else 0
            print(
                f"{job:<18} {name:<9} {r['mbps']:>8.1f} {r['iops']:>8.0f} "
                f"{fmt_us(r['p99_us']):>9} {ratio:>7} {lat:>6} {sc:>11.2f} {per_gb:>9.2f} "
                f"{cpu.get('other_cpus', 0):>10.2f}"
            )
            each = cpu.get("each_cpus", [])
            if server == "tidemark" and len(each) == 2 and r["mbps"]:
                gb = r["mbps"] / 1000
                print(
                    f"{'':<18} {'':<9} CPU s/GB: primary {each[0] / gb:.2f}, "
                    f"secondary {each[1] / gb:.2f}"
                )
        rows.append((job, q, med["tidemark"][0], med["tidemark"][2]))
    print()
    print("Replication during the tidemark write jobs (median round; secondary's status.json):")
    print(
        f"{'job':<18} {'lag p50':>9} {'lag p99':>9} {'max backlog':>12} "
        f"{'backlog@end':>12} {'applied all':>12} {'kept up':>8}"
    )
    for job, _, _, stem in rows:
        if not os.path.exists(stem + ".settle.json"):
            continue
        st = json.load(open(stem + ".settle.json", encoding="utf-8"))
        samples = json.load(open(stem + ".watch.json", encoding="utf-8"))
        backlog = max((x["written"] - x["applied"] for x in samples), default=0)
        caught = st["caught_up_s"]
        after = f"+{caught:.2f} s" if caught is not None else "NO"
        kept = "yes" if caught is not None and caught < 2.0 else "no"
        print(
            f"{job:<18} {fmt_us(st['lag_p50_us']):>9} {fmt_us(st['lag_p99_us']):>9} "
            f"{backlog:>12} {st['written'] - st['applied']:>12} {after:>12} {kept:>8}"
        )
    print(
        "(backlog: writes the primary stamped that the secondary had not applied; "
        "'applied all': after the job ended; kept up = within 2 s)"
    )
    print()
    targets = {"seqwrite-64k-qd16": 0.9, "randwrite-4k-qd16": 0.8}
    for job, q, t, _ in rows:
        if job in targets:
            r = t["mbps"] / q["mbps"]
            verdict = "meets" if r >= targets[job] else "BELOW"
            print(f"target {job}: >= {targets[job]}x qemu-nbd, measured {r:.2f}x: {verdict}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fio":
        run_fio(args[0], args[1], args[2:])
    elif cmd == "summary":
        print(json.dumps(fio_summary(args[0])))
    elif cmd == "watch":
        watch(*args)
    elif cmd == "settle":
        settle(*args)
    elif cmd == "table":
        table(*args)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
