#!/usr/bin/env python3
"""Numbers for scripts/bench.sh (standard library only).

  report.py summarize RUN_DIR      after one pgbench run: read its output, per-transaction
                                   logs (log.*) and proxy CPU ticks, write RUN_DIR/stats.json,
                                   delete the logs
  report.py table RUNS_DIR         print the Markdown results table and the checks of
                                   issue 3's "done when" list
  report.py connections RUNS_DIR   print the idle-clients / many-clients section (from
                                   RUNS_DIR/connections.env and RUNS_DIR/conc/...); exit 3
                                   if a connection failed or the concurrent run had errors
  report.py errors RUNS_DIR        print the runs against shardwire (or direct) that had
                                   errors; exit 3 if there is any (the smoke test's verdict)

A run directory is RUNS_DIR/<workload>/<target>/r<round>/ with files cmd, out, err, rc,
cpu ("<utime> <stime>" of the proxy process in ticks before, then after, or "-"), and
log.* (pgbench -l). RUNS_DIR/workloads.tsv lists "<id>\t<label>" in display order.
RUNS_DIR/servers/servers-{1,4}/r<round>/ hold PostgreSQL alone, four servers against one
(files out.0-3, rc, tps: the four pgbench runs' summed TPS).
"""

import glob
import json
import os
import re
import statistics
import sys

TARGETS = ["direct", "pgbouncer", "shardwire", "shardwire-4", "shardwire-4x1"]
TARGET_LABEL = {
    "direct": "direct PostgreSQL",
    "pgbouncer": "PgBouncer",
    "shardwire": "shardwire 1 shard",
    "shardwire-4": "shardwire 4 shards",
    "shardwire-4x1": "shardwire 4 shards on 1 server",
}


def read(path, default=""):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return default


def num(pattern, text, cast=float):
    m = re.search(pattern, text, re.M)
    return cast(m.group(1)) if m else None


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def first_error(text):
    for line in text.splitlines():
        low = line.lower()
        if "error" in low or "fatal" in low or "aborted" in low:
            return line.strip()[:200]
    return ""


def summarize(run_dir):
    out = read(os.path.join(run_dir, "out"))
    err = read(os.path.join(run_dir, "err"))
    both = out + "\n" + err
    rc = int(read(os.path.join(run_dir, "rc"), "1").strip() or 1)
    stats = {
        "rc": rc,
        "tps": num(r"^tps = ([0-9.]+)", out),
        "txns": num(r"number of transactions actually processed: (\d+)", out, int) or 0,
        "failed": num(r"number of failed transactions: (\d+)", out, int) or 0,
        "lat_avg_ms": num(r"^latency average = ([0-9.]+) ms", out),
        "conn_ms": num(r"average connection time = ([0-9.]+) ms", out),
        "aborted": len(re.findall(r"client \d+ aborted", both)),
        "error": first_error(err) or first_error(out),
    }
    lats = []
    for path in glob.glob(os.path.join(run_dir, "log.*")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lats.append(int(parts[2]))
        os.remove(path)
    lats.sort()
    stats["logged"] = len(lats)
    stats["p50_ms"] = percentile(lats, 50) / 1000.0 if lats else None
    stats["p99_ms"] = percentile(lats, 99) / 1000.0 if lats else None
    stats["max_ms"] = lats[-1] / 1000.0 if lats else None
    # "utime stime" before, then after (an older run's file: utime+stime before, after).
    cpu = [int(v) for v in read(os.path.join(run_dir, "cpu"), "-").split() if v.isdigit()]
    stats["cpu_us_per_txn"] = stats["user_us_per_txn"] = stats["sys_us_per_txn"] = None
    if len(cpu) in (2, 4) and stats["txns"] > 0:
        hz = int(os.environ.get("CLK_TCK") or os.sysconf("SC_CLK_TCK"))
        per_txn = 1e6 / hz / stats["txns"]
        if len(cpu) == 4:
            user, system = cpu[2] - cpu[0], cpu[3] - cpu[1]
            stats["user_us_per_txn"] = user * per_txn
            stats["sys_us_per_txn"] = system * per_txn
            ticks = user + system
        else:
            ticks = cpu[1] - cpu[0]
        stats["cpu_ticks"] = ticks
        stats["cpu_us_per_txn"] = ticks * per_txn
    stats["ok"] = (
        rc == 0
        and stats["aborted"] == 0
        and stats["failed"] == 0
        and stats["txns"] > 0
        and stats["tps"] is not None
    )
    with open(os.path.join(run_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    return stats


def load(runs_dir):
    """{workload: {target: [stats per round, in round order]}}, and the workload labels."""
    labels = []
    for line in read(os.path.join(runs_dir, "workloads.tsv")).splitlines():
        if "\t" in line:
            wid, label = line.split("\t", 1)
            labels.append((wid, label))
    data = {}
    for wid, _ in labels:
        for target in TARGETS:
            rounds = sorted(
                glob.glob(os.path.join(runs_dir, wid, target, "r*")),
                key=lambda p: int(os.path.basename(p)[1:]),
            )
            runs = []
            for r in rounds:
                s = os.path.join(r, "stats.json")
                if not os.path.exists(s):
                    summarize(r)
                with open(s, encoding="utf-8") as f:
                    st = json.load(f)
                st["dir"] = r
                runs.append(st)
            if runs:
                data.setdefault(wid, {})[target] = runs
    return labels, data


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def agg(runs):
    ok = [r for r in runs if r["ok"]]
    a = {
        "n": len(runs),
        "n_ok": len(ok),
        "tps": med([r["tps"] for r in ok]),
        "tps_min": min((r["tps"] for r in ok), default=None),
        "tps_max": max((r["tps"] for r in ok), default=None),
        "lat": med([r["lat_avg_ms"] for r in ok]),
        "p50": med([r["p50_ms"] for r in ok]),
        "p99": med([r["p99_ms"] for r in ok]),
        "cpu": med([r["cpu_us_per_txn"] for r in ok]),
        "cpu_user": med([r.get("user_us_per_txn") for r in ok]),
        "cpu_sys": med([r.get("sys_us_per_txn") for r in ok]),
        "conn": med([r["conn_ms"] for r in ok]),
        "errors": [r for r in runs if not r["ok"]],
    }
    return a


def f(v, fmt="{:.0f}"):
    return "—" if v is None else fmt.format(v)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return "{:.2f}×".format(a / b)


def table(runs_dir):
    labels, data = load(runs_dir)
    lines = [
        "| workload | target | median TPS | min–max TPS | × direct | × PgBouncer "
        "| avg lat ms | p50 ms | p99 ms | proxy CPU µs/txn | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    aggs = {}
    for wid, label in labels:
        targets = data.get(wid, {})
        aggs[wid] = {t: agg(r) for t, r in targets.items()}
        base = aggs[wid].get("direct", {}).get("tps")
        pgb = aggs[wid].get("pgbouncer", {}).get("tps")
        for t in TARGETS:
            if t not in aggs[wid]:
                continue
            a = aggs[wid][t]
            notes = []
            if a["n_ok"] == 0:
                tps = "n/a (fails)"
                rng = "—"
            else:
                tps = f(a["tps"])
                rng = "{}–{}".format(f(a["tps_min"]), f(a["tps_max"]))
            if a["errors"]:
                e = a["errors"][0]
                msg = e.get("error") or "exit status {}".format(e["rc"])
                notes.append(
                    "errors in {}/{} runs: `{}`".format(
                        len(a["errors"]), a["n"], msg.replace("|", "\\|").replace("`", "'")
                    )
                )
            if a["conn"] is not None and "storm" in wid:
                notes.append("avg connection {:.2f} ms".format(a["conn"]))
            if t in ("shardwire-4", "shardwire-4x1"):
                one = aggs[wid].get("shardwire", {}).get("tps")
                if one and a["tps"]:
                    notes.append("{} shardwire 1 shard".format(ratio(a["tps"], one)))
            if t == "shardwire-4":
                on_one = aggs[wid].get("shardwire-4x1", {}).get("tps")
                if on_one and a["tps"]:
                    notes.append("{} shardwire 4 shards on 1 server".format(ratio(a["tps"], on_one)))
            if a["n_ok"] and a["n_ok"] < a["n"]:
                notes.append("figures from the {} clean runs".format(a["n_ok"]))
            is_proxy = t != "direct"
            lines.append(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    label,
                    TARGET_LABEL[t],
                    tps,
                    rng,
                    ratio(a["tps"], base) if t != "direct" else "1.00×",
                    ratio(a["tps"], pgb) if t not in ("direct", "pgbouncer") else "—",
                    f(a["lat"], "{:.3f}"),
                    f(a["p50"], "{:.3f}"),
                    f(a["p99"], "{:.3f}"),
                    f(a["cpu"], "{:.1f}") if is_proxy else "—",
                    "; ".join(notes),
                )
            )
    print("\n".join(lines))
    print()
    print(checks(aggs, data, runs_dir))


def paired(data, wid, a, b, key="tps"):
    """a/b round by round (the two run next to each other in every round, so a slow
    minute on the shared machine hits both), as "r1/r2/…, median X×"; None if no round
    has both."""
    by_round = {}
    for t in (a, b):
        for r in data.get(wid, {}).get(t, []):
            if r["ok"] and r.get(key) is not None:
                by_round.setdefault(os.path.basename(r["dir"]), {})[t] = r[key]
    ratios = [v[a] / v[b] for _, v in sorted(by_round.items()) if a in v and b in v and v[b]]
    if not ratios:
        return None
    return "per round {}, median {:.2f}×".format(
        "/".join("{:.2f}".format(x) for x in ratios), statistics.median(ratios)
    )


def checks(aggs, data, runs_dir):
    """Issue 3's 'done when' items that one bench run can decide. Verdicts use the
    medians (the issue's wording); the round-by-round ratios are shown beside them."""

    def g(wid, t, k="tps"):
        return aggs.get(wid, {}).get(t, {}).get(k)

    def also(wid, a, b, key="tps"):
        p = paired(data, wid, a, b, key)
        return "; " + p if p else ""

    def verdict(ok):
        return "**yes**" if ok else "**no**"

    out = ["Checks (issue 3, from this run's medians):", ""]
    for wid, name in (("S-simple", "-S simple"), ("S-extended", "-S extended")):
        sw, pb = g(wid, "shardwire"), g(wid, "pgbouncer")
        if sw is not None or pb is not None:
            ok = sw is not None and pb is not None and sw >= pb
            out.append(
                "- shardwire 1 shard ≥ 1.00× PgBouncer on {}: {} ({}{})".format(
                    name, verdict(ok), ratio(sw, pb), also(wid, "shardwire", "pgbouncer")
                )
            )
    if "S-prepared" in aggs and "shardwire" in aggs["S-prepared"]:
        a = aggs["S-prepared"]["shardwire"]
        out.append(
            "- `-M prepared` through shardwire with zero errors: {} ({} of {} runs clean)".format(
                verdict(not a["errors"]), a["n_ok"], a["n"]
            )
        )
    sw, pb = g("point", "shardwire", "lat"), g("point", "pgbouncer", "lat")
    if sw is not None or pb is not None:
        out.append(
            "- `-c 1` point read average latency ≤ PgBouncer's: {} ({} ms vs {} ms)".format(
                verdict(sw is not None and pb is not None and sw <= pb),
                f(sw, "{:.3f}"),
                f(pb, "{:.3f}"),
            )
        )
    sw, pb = g("S-simple", "shardwire", "cpu"), g("S-simple", "pgbouncer", "cpu")
    if sw is not None or pb is not None:
        out.append(
            "- shardwire's own CPU per `-S` (simple) transaction ≤ PgBouncer's: {} "
            "({} µs vs {} µs{})".format(
                verdict(sw is not None and pb is not None and sw <= pb),
                f(sw, "{:.1f}"),
                f(pb, "{:.1f}"),
                also("S-simple", "shardwire", "pgbouncer", "cpu_us_per_txn"),
            )
        )
        su, pu = g("S-simple", "shardwire", "cpu_user"), g("S-simple", "pgbouncer", "cpu_user")
        ss, ps = g("S-simple", "shardwire", "cpu_sys"), g("S-simple", "pgbouncer", "cpu_sys")
        if None not in (su, pu, ss, ps):
            out.append(
                "  - of which in the process itself (user time): {} µs vs {} µs; in the kernel "
                "on its behalf (system time: its sends and receives, waking the other side, "
                "being switched out): {} µs vs {} µs".format(
                    f(su, "{:.1f}"), f(pu, "{:.1f}"), f(ss, "{:.1f}"), f(ps, "{:.1f}")
                )
            )
    for wid, name in (
        ("S-simple", "-S simple"),
        ("S-extended", "-S extended"),
        ("S-prepared", "-S prepared"),
    ):
        four, one = g(wid, "shardwire-4"), g(wid, "shardwire")
        if four is not None or one is not None:
            out.append(
                "- shardwire 4 shards ≥ 0.90× its own 1-shard TPS on {}: {} ({}{})".format(
                    name,
                    verdict(four is not None and one is not None and four >= 0.9 * one),
                    ratio(four, one),
                    also(wid, "shardwire-4", "shardwire"),
                )
            )
        on_one = g(wid, "shardwire-4x1")
        if on_one is not None and one is not None:
            out.append(
                "  - of which the router (4 shards on 1 server vs 1 shard): {}{}; four PostgreSQL "
                "servers (4 shards vs 4 shards on 1 server): {}{}".format(
                    ratio(on_one, one),
                    also(wid, "shardwire-4x1", "shardwire"),
                    ratio(four, on_one),
                    also(wid, "shardwire-4", "shardwire-4x1"),
                )
            )
    servers = servers_ratio(runs_dir)
    if servers:
        out.append(
            "- for comparison, PostgreSQL alone (no router): four servers against one, "
            "the same `-S` simple load as four pgbench runs of a quarter of the clients: "
            + servers
        )
    return "\n".join(out)


def servers_ratio(runs_dir):
    """servers_pair's runs: the ratio of the medians, and round by round."""
    tps = {}
    for t in ("servers-1", "servers-4"):
        for r in glob.glob(os.path.join(runs_dir, "servers", t, "r*")):
            v = read(os.path.join(r, "tps")).strip()
            if v and float(v) > 0 and read(os.path.join(r, "rc")).strip() == "0":
                tps.setdefault(t, {})[os.path.basename(r)] = float(v)
    one, four = tps.get("servers-1", {}), tps.get("servers-4", {})
    if not one or not four:
        return ""
    rounds = sorted(set(one) & set(four), key=lambda r: int(r[1:]))
    per = "/".join("{:.2f}".format(four[r] / one[r]) for r in rounds)
    return "{} ({} vs {} TPS; per round {})".format(
        ratio(med(four.values()), med(one.values())),
        f(med(four.values())),
        f(med(one.values())),
        per,
    )


def errors(runs_dir):
    labels, data = load(runs_dir)
    bad = 0
    for wid, _ in labels:
        for t, runs in data.get(wid, {}).items():
            if t not in ("shardwire", "shardwire-4", "shardwire-4x1", "direct"):
                continue
            for r in runs:
                if not r["ok"]:
                    bad += 1
                    print(
                        "{} / {} / {}: exit {}, {} aborted clients, {} failed transactions, "
                        "{} transactions: {}".format(
                            wid, t, os.path.basename(r["dir"]), r["rc"], r["aborted"],
                            r["failed"], r["txns"], r.get("error") or "",
                        )
                    )
    for r in sorted(glob.glob(os.path.join(runs_dir, "servers", "*", "r*"))):
        if read(os.path.join(r, "rc")).strip() != "0" or not read(os.path.join(r, "tps")).strip():
            bad += 1
            print("PostgreSQL alone ({}): a pgbench run failed: {}".format(
                os.path.relpath(r, runs_dir),
                " ".join(first_error(read(p)) for p in sorted(glob.glob(os.path.join(r, "out.*"))))
                .strip()))
    return 3 if bad else 0


def connections(runs_dir):
    env = {}
    for line in read(os.path.join(runs_dir, "connections.env")).splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    if not env:
        return 0
    bad = False
    n = int(env.get("idle_n", 0))
    ok, failed = int(env.get("idle_ok", 0)), int(env.get("idle_failed", n))
    rss0, rss1, rss2 = (int(env.get(k, 0) or 0) for k in ("rss0_kb", "rss1_kb", "rss2_kb"))
    grow = rss1 - rss0
    per = grow / ok if ok else 0.0
    bad |= failed > 0 or ok != n
    print("| test | result |")
    print("|---|---|")
    print(
        "| {:,} idle clients held open (pool.size {}) | {:,} connected, {} failed, in {} s; "
        "router RSS {:.1f} MiB before → {:.1f} MiB with all connected: **+{:.1f} MiB in total, "
        "{:.1f} KiB per client** ({:.1f} MiB after they disconnected) |".format(
            n, env.get("pool", "?"), ok, failed, env.get("idle_secs", "?"),
            rss0 / 1024, rss1 / 1024, grow / 1024, per, rss2 / 1024,
        )
    )
    if env.get("idle_error"):
        print("| idle clients: first error | `{}` |".format(env["idle_error"].replace("|", "\\|")))
    run = os.path.join(runs_dir, "conc", "shardwire", "r1")
    if os.path.isdir(run):
        st_path = os.path.join(run, "stats.json")
        if not os.path.exists(st_path):
            summarize(run)
        with open(st_path, encoding="utf-8") as fh:
            st = json.load(fh)
        bad |= not st["ok"]
        print(
            "| {} concurrent clients, `-S` simple for {} s over pool.size {} | {} TPS, "
            "{} transactions, {} failed, {} aborted clients, exit status {}; latency avg {} ms, "
            "p50 {} ms, p99 {} ms, max {} ms; shardwire CPU {} µs/txn{} |".format(
                env.get("conc_n", "?"), env.get("conc_secs", "?"), env.get("pool", "?"),
                f(st["tps"]), st["txns"], st["failed"], st["aborted"], st["rc"],
                f(st["lat_avg_ms"], "{:.2f}"), f(st["p50_ms"], "{:.2f}"),
                f(st["p99_ms"], "{:.2f}"), f(st.get("max_ms"), "{:.1f}"),
                f(st["cpu_us_per_txn"], "{:.1f}"),
                "; error: `{}`".format(st["error"].replace("|", "\\|")) if st.get("error") else "",
            )
        )
    return 3 if bad else 0


def main(argv):
    if len(argv) != 3 or argv[1] not in ("summarize", "table", "errors", "connections"):
        sys.stderr.write(__doc__)
        return 2
    if argv[1] == "summarize":
        summarize(argv[2])
        return 0
    if argv[1] == "table":
        table(argv[2])
        return 0
    if argv[1] == "connections":
        return connections(argv[2])
    return errors(argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
