#!/usr/bin/env python3
"""Link rates over time from hack/bench/timeline.sh's samples.txt.

Usage: timeline_report.py SAMPLES.txt --vms N --rate MBIT [--step S]

Prints a markdown table: per time step, every VM's downlink rate (Mbit/s), their sum, the
busiest and idlest downlink, the sum of the uplinks and the registry's uplink; then each
VM's average downlink and uplink rate over the start (until the downlinks first fall under
a quarter of their capacity: background prefetch comes later).
"""

import argparse


def load(path, vms):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 2 + 2 * vms:
                continue  # the sampler was killed mid-line
            rows.append([int(p) for p in parts])
    return rows


def rates(a, b, vms):
    """(downlinks, uplinks, registry) in Mbit/s between samples a and b."""
    dt = (b[0] - a[0]) / 1e9
    mbit = lambda x: x * 8 / dt / 1e6
    down = [mbit(b[1 + 2 * i] - a[1 + 2 * i]) for i in range(vms)]
    up = [mbit(b[2 + 2 * i] - a[2 + 2 * i]) for i in range(vms)]
    return down, up, mbit(b[-1] - a[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    ap.add_argument("--vms", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True, help="VM link rate, Mbit/s")
    ap.add_argument("--step", type=float, default=1.0, help="table step, s")
    a = ap.parse_args()
    rows = load(a.samples, a.vms)
    if len(rows) < 2:
        raise SystemExit(f"{a.samples}: fewer than two samples")
    t0 = rows[0][0]
    print(f"| t (s) | downlinks sum | min | max | uplinks sum | registry | of {a.vms} x {a.rate:g} Mbit/s |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    last, busy_until, quiet = rows[0], None, False
    for r in rows[1:]:
        if (r[0] - last[0]) / 1e9 < a.step:
            continue
        down, up, reg = rates(last, r, a.vms)
        print(
            f"| {(r[0] - t0) / 1e9:.1f} | {sum(down):.0f} | {min(down):.0f} | {max(down):.0f} "
            f"| {sum(up):.0f} | {reg:.0f} | {100 * sum(down) / (a.vms * a.rate):.0f}% |"
        )
        # The start's transfer is over when the downlinks first fall under 25% of their
        # capacity after being busy (background prefetch comes back later).
        busy = sum(down) > 0.25 * a.vms * a.rate
        if busy and not quiet:
            busy_until = r
        elif busy_until is not None:
            quiet = True
        last = r
    if busy_until is None:
        raise SystemExit("the downlinks never got busy")
    down, up, reg = rates(rows[0], busy_until, a.vms)
    span = (busy_until[0] - t0) / 1e9
    print(f"\nAverages over the first {span:.1f} s (until the downlinks first fell under a quarter of their capacity), Mbit/s:\n")
    print("| VM | downlink | uplink |")
    print("|---|---:|---:|")
    for i in range(a.vms):
        print(f"| vm{i} | {down[i]:.1f} | {up[i]:.1f} |")
    print(f"| all | {sum(down) / a.vms:.1f} | {sum(up) / a.vms:.1f} |")
    print(f"\nregistry uplink {reg:.1f} Mbit/s on average")


if __name__ == "__main__":
    main()
