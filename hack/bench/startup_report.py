#!/usr/bin/env python3
"""Report of hack/bench/startup.sh: tables, ratios and the tree's lower bound, from results.json.

Usage: startup_report.py RESULTS.json [--doc FILE.md] [--plot FILE.png] [--sim BIN]

Prints the markdown; --doc also writes it to FILE.md. --plot draws p50 and max start time
against N per mode with the simulator's plotting command (`faasnet-sim plot`, plotters), built
from this repository unless --sim names a binary.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

MODES = ["baseline", "ondemand", "faasnet", "stripes"]
# Modes with a function tree: the targets apply to each. faasnet: one tree with the sibling
# exchange; stripes: even blocks down the function tree, odd ones down the second stripe tree.
TREE_MODES = ["faasnet", "stripes"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tree_height(n):
    """Levels of the coordinator's balanced binary tree of n nodes: ceil(log2(n + 1))."""
    return math.ceil(math.log2(n + 1))


def starts(run):
    """Start times (s) of the VMs that printed their first line."""
    return [v["start_ms"] / 1000 for v in run["vms"] if v.get("ok") and v.get("start_ms") is not None]


def summary(results):
    """{mode: {n: dict}} with p50, max, failures, registry bytes and CPU use of each run."""
    out = {}
    for run in results["runs"]:
        s = starts(run)
        out.setdefault(run["mode"], {})[run["n"]] = {
            "p50": statistics.median(s) if s else None,
            "max": max(s) if s else None,
            "failed": len(run["vms"]) - len(s),
            "registry_bytes": run["registry_bytes"],
            "cpu": run.get("cpu_busy"),
            "run": run,
        }
    return out


def warm_at_n(results):
    """{(mode, n): max start (s)} of the warm runs at N (every block cached), if measured."""
    out = {}
    for run in results.get("warm_runs", []):
        s = starts(run)
        if s:
            out[(run["mode"], run["n"])] = max(s)
    return out


def fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def times(x):
    """A ratio as `1.23x`, or a dash."""
    return "–" if x is None else f"{x:.2f}x"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def report(results):
    p = results["params"]
    r = p["vm_link_bps"]
    b = p["block_size"]
    w_run = results["working_set"]
    w = w_run["vms"][0]["registry_bytes"]
    warm = results["warm"]["vms"][0]["start_ms"] / 1000
    cold1 = w_run["vms"][0]["start_ms"] / 1000
    s = summary(results)
    ns = sorted({n for m in s.values() for n in m})
    lines = []
    add = lines.append
    add("# Benchmark: start one function on N VMs at once")
    add("")
    add("Written by `hack/bench/startup.sh` (raw data: results.json of the run, "
        "this page by `hack/bench/startup_report.py`).")
    add("")
    add(f"- Run of {p['date']} on {p['cpus']} CPUs. Image `{p['image']}`: original "
        f"`{p['original']}`, converted `{p['converted']}`.")
    add(f"- Every VM link {r * 8 / 1e6:.0f} Mbit/s each way; registry egress "
        f"{p['registry_egress_bps'] * 8 / 1e6:.0f} Mbit/s (4 VM links). Block size {b // 1024} KiB.")
    add(f"- Start time: from the request (pull) to the function's first output line, per VM.")
    add(f"- Working set W = {w / 1e6:.1f} MB: registry bytes one VM fetched for one cold "
        f"start with prefetch off ({cold1:.1f} s). Warm start (all needed blocks cached): "
        f"{warm:.2f} s.")
    if "working_set_unprofiled" in results:
        u = results["working_set_unprofiled"]["vms"][0]
        add(f"- Start profile: the lazy modes run the image converted with the "
            f"{results['start_profile_files']} files a first cold start of the plain conversion "
            f"read laid out first in each layer (`image-converter convert --start-profile`). "
            f"The plain conversion's W is {u['registry_bytes'] / 1e6:.1f} MB "
            f"(cold start {u['start_ms'] / 1000:.1f} s); the baseline pulls the original image.")
    add("")
    add("## Start time against N")
    add("")
    add("| mode | N | p50 (s) | max (s) | failed | registry MB | CPU busy |")
    add("|---|---:|---:|---:|---:|---:|---:|")
    for m in MODES:
        for n in ns:
            x = s.get(m, {}).get(n)
            if not x:
                continue
            cpu = "–" if x["cpu"] is None else f"{100 * x['cpu']:.0f}%"
            add(f"| {m} | {n} | {fmt(x['p50'])} | {fmt(x['max'])} | {x['failed']} | "
                f"{x['registry_bytes'] / 1e6:.0f} | {cpu} |")
    add("")
    trees = [m for m in TREE_MODES if s.get(m)]
    add("## Ratios (higher is better for the tree)")
    add("")
    add("| tree mode | N | baseline/tree p50 | baseline/tree max | on-demand/tree p50 | "
        "on-demand/tree max |")
    add("|---|---:|---:|---:|---:|---:|")
    for t in trees:
        for n in ns:
            f = s[t].get(n, {})
            bl = s.get("baseline", {}).get(n, {})
            od = s.get("ondemand", {}).get(n, {})
            cells = [ratio(bl.get(k), f.get(k)) for k in ("p50", "max")]
            cells += [ratio(od.get(k), f.get(k)) for k in ("p50", "max")]
            add(f"| {t} | {n} | " + " | ".join(times(c) for c in cells) + " |")
    add("")
    add("## The tree against its lower bound")
    add("")
    add("Lower bound of the slowest VM: every VM must receive W over a link of rate r, and a "
        "block crosses the h levels of the tree one after the other: W/r + h·b/r, plus the "
        "warm start (the container's own start with every block local).")
    warm_n = warm_at_n(results)
    if warm_n:
        add("")
        add("Warm at N: right after the run, the same N VMs start the function again with every "
            "block cached. That is what N starts at once cost this machine's 2 CPUs with no "
            "network in the way; the bound with it is W/r + h·b/r + warm at N.")
    add("")
    add("| tree mode | N | h | bound (s) | max (s) | max / bound | warm at N max (s) | "
        "bound with it (s) | max / it |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in trees:
        for n in ns:
            f = s[t].get(n)
            if not f:
                continue
            h = tree_height(n)
            transfer = w / r + h * b / r
            bound = transfer + warm
            wn = warm_n.get((t, n))
            bound_n = None if wn is None else transfer + wn
            add(f"| {t} | {n} | {h} | {bound:.1f} | {fmt(f['max'])} | "
                f"{times(ratio(f['max'], bound))} | {fmt(wn, 2)} | {fmt(bound_n)} | "
                f"{times(ratio(f['max'], bound_n))} |")
    add("")
    add("## Targets")
    add("")

    def verdict(x, ok):
        return "–" if x is None else ("met" if ok(x) else "not met")

    add("| tree mode | target | measured (max start) | verdict |")
    add("|---|---|---:|---|")
    for t in trees:
        big = max(s[t])
        f1 = s[t].get(1, {}).get("max")
        fb = s[t][big]["max"]
        flat = ratio(fb, f1)
        bl = ratio(s.get("baseline", {}).get(big, {}).get("max"), fb)
        od = ratio(s.get("ondemand", {}).get(big, {}).get("max"), fb)
        bound = w / r + tree_height(big) * b / r + warm
        lb = ratio(fb, bound)
        add(f"| {t} | at N={big} within 1.3x of N=1 | {times(flat)} | "
            f"{verdict(flat, lambda x: x <= 1.3)} |")
        add(f"| {t} | baseline/tree at N={big} ≥ 10x | {times(bl)} | "
            f"{verdict(bl, lambda x: x >= 10)} |")
        add(f"| {t} | on-demand/tree at N={big} ≥ 2x | {times(od)} | "
            f"{verdict(od, lambda x: x >= 2)} |")
        add(f"| {t} | within 1.5x of the lower bound at N={big} | {times(lb)} | "
            f"{verdict(lb, lambda x: x <= 1.5)} |")
    add("")
    add("## Per VM")
    add("")
    add("| mode | N | VM | start (s) | registry MB | peer MB | received MB |")
    add("|---|---:|---|---:|---:|---:|---:|")
    for m in MODES:
        for n in ns:
            x = s.get(m, {}).get(n)
            if not x:
                continue
            for v in x["run"]["vms"]:
                st = fmt(v["start_ms"] / 1000 if v.get("start_ms") is not None else None)
                add(f"| {m} | {n} | {v['vm']} | {st} | {v['registry_bytes'] / 1e6:.1f} | "
                    f"{v['peer_bytes'] / 1e6:.1f} | {v['rx_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n", s, ns


def plot(s, ns, path, sim):
    series = {}
    for m in MODES:
        pts = [(n, s[m][n]["p50"], s[m][n]["max"]) for n in ns if n in s.get(m, {}) and s[m][n]["max"]]
        if pts:
            series[m] = pts
    data = path + ".json"
    with open(data, "w") as f:
        json.dump({"title": "Start time of one function on N VMs (testbed)", "series": series}, f)
    if sim is None:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "faasnet-simulator"], cwd=REPO, check=True)
        sim = os.path.join(REPO, "target", "release", "faasnet-sim")
    subprocess.run([sim, "plot", "--data", data, "--out", path], check=True)
    os.remove(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--doc")
    ap.add_argument("--plot")
    ap.add_argument("--sim")
    a = ap.parse_args()
    with open(a.results) as f:
        results = json.load(f)
    text, s, ns = report(results)
    if a.plot:
        os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
        plot(s, ns, a.plot, a.sim)
        rel = os.path.relpath(a.plot, os.path.dirname(os.path.abspath(a.doc))) if a.doc else a.plot
        text = text.replace("## Start time against N\n\n", f"## Start time against N\n\n![start time against N]({rel})\n\n", 1)
    if a.doc:
        with open(a.doc, "w") as f:
            f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
