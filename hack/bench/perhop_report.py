#!/usr/bin/env python3
"""Where a block's time goes on each hop of the tree, from the snapshotters' trace logs.

Run a start on the testbed with the block traces on, e.g.

    FAASNET_TB_LOG="info,faasnet_snapshotter::lazy::peer_server=trace,faasnet_snapshotter::lazy::block_store=trace" \
      hack/bench/timeline.sh --vms 16 --out DIR
    hack/bench/perhop_report.py [/run/faasnet-testbed]

For every block a parent served to a child it pairs the child's request ("block asked"), the
parent's own "block landed", the parent's "block served" (logged once the block is written
to the socket) and the child's "block landed", and splits the hop into:

  parent wait   the parent did not hold the block yet when the child asked
  uplink        from the moment the parent held it until it was written (its uplink turn)
  arrival       from the write to the child's landing (wire, queue, verification)

It also prints, per child, how long its requests waited on parents in all; per VM, its parents
for even and odd blocks and when its 10th, 20th, 30th and 40th block of each parity landed
(stripe progress: does a VM lag its parent, or do all move at their roots' pace?); and lists
the peer fetches that gave up on keep-alives (a stalled or circular wait). A diagnosis tool: it
asserts nothing.
"""
import datetime
import glob
import os
import re
import statistics
import sys

RUN = sys.argv[1] if len(sys.argv) > 1 else "/run/faasnet-testbed"
# VM i has address 10.79.0.<10+i> (hack/testbed.sh).
VM_OF_IP = lambda ip: int(ip.rsplit(".", 1)[1]) - 10  # noqa: E731


def stamp(line):
    return datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


landed, asked, served, stalls = {}, {}, {}, []
vms = sorted(int(re.search(r"vm(\d+)$", d).group(1)) for d in glob.glob(f"{RUN}/vm*") if re.search(r"vm\d+$", d))
for vm in vms:
    with open(os.path.join(RUN, f"vm{vm}", "snapshotter.log"), errors="replace") as f:
        for line in f:
            if "not sent within" in line:
                stalls.append((vm, line.strip()[:26], re.search(r"error=(.*)", line).group(1)))
            if "TRACE" not in line:
                continue
            m = re.search(r"layer=(\S+) index=(\d+)", line)
            if not m:
                continue
            key = (m.group(1), int(m.group(2)))
            t = stamp(line)
            peer = re.search(r"peer_conn\{peer=([\d.]+):\d+\}", line)
            if "block landed" in line:
                landed.setdefault(vm, {}).setdefault(key, t)
            elif peer and "block asked" in line:
                asked.setdefault((vm, VM_OF_IP(peer.group(1))), {}).setdefault(key, t)
            elif peer and "block served" in line:
                cls = re.search(r"class=(\w+)", line)
                served.setdefault((vm, VM_OF_IP(peer.group(1))), {}).setdefault(
                    key, (t, cls.group(1) if cls else "?"))

hops = []  # (class, parent, child, parent wait, uplink, arrival, total)
for (parent, child), blocks in served.items():
    for key, (t_served, cls) in blocks.items():
        t_asked = asked.get((parent, child), {}).get(key)
        t_child = landed.get(child, {}).get(key)
        if t_asked is None or t_child is None:
            continue
        t_held = max(t_asked, landed.get(parent, {}).get(key, t_asked))
        hops.append((cls, parent, child, t_held - t_asked, t_served - t_held, t_child - t_served, t_child - t_asked))

if not hops:
    sys.exit(f"no paired block traces under {RUN}: were the snapshotters started with the trace filter?")
print(f"{len(hops)} hops from {len(vms)} VMs under {RUN} (seconds, p50 / p90)\n")
print("| class | hops | parent wait | uplink | arrival | total |")
print("|---|---:|---:|---:|---:|---:|")
for cls in sorted({h[0] for h in hops}):
    rows = [h for h in hops if h[0] == cls]
    cells = " | ".join(f"{statistics.median(r[j] for r in rows):.2f} / {pct([r[j] for r in rows], 0.9):.2f}" for j in (3, 4, 5, 6))
    print(f"| {cls} | {len(rows)} | {cells} |")
print("\nStart-time requests (not prefetch) per child:\n")
print("| child | hops | parent wait, sum (s) | parent wait p90 (s) | parents |")
print("|---|---:|---:|---:|---|")
for child in vms:
    rows = [h for h in hops if h[2] == child and h[0] != "Prefetch"]
    if rows:
        parents = " ".join(f"vm{p}" for p in sorted({h[1] for h in rows}))
        print(f"| vm{child} | {len(rows)} | {sum(h[3] for h in rows):.1f} | {pct([h[3] for h in rows], 0.9):.2f} | {parents} |")
t0 = min(t for blocks in landed.values() for t in blocks.values())
print("\nStripe progress: s after the first block landed anywhere, by which the 10th / 20th /"
      " 30th / 40th block of each parity had landed (no parent: the registry, a root)\n")
print("| VM | even from | even | odd from | odd |")
print("|---|---|---|---|---|")
parents_of = {}  # (child, parity) -> parents that served it
for (parent, child), blocks in served.items():
    for key in blocks:
        parents_of.setdefault((child, key[1] % 2), set()).add(parent)
for vm in vms:
    cells = []
    for parity in (0, 1):
        times = sorted(t - t0 for key, t in landed.get(vm, {}).items() if key[1] % 2 == parity)
        marks = " / ".join(f"{times[n - 1]:.1f}" if len(times) >= n else "-" for n in (10, 20, 30, 40))
        who = " ".join(f"vm{p}" for p in sorted(parents_of.get((vm, parity), ()))) or "no parent"
        cells += [who, marks]
    print(f"| vm{vm} | " + " | ".join(cells) + " |")
print(f"\nPeer fetches that gave up on keep-alives: {len(stalls)}")
for vm, t, err in sorted(stalls, key=lambda s: s[1]):
    print(f"- vm{vm} {t}: {err}")
