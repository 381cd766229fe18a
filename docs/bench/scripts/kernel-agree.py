#!/usr/bin/env python3
"""Do full `dvma bench kernel` runs agree? For every pair (dvma, completion,
workload, depth): the spread of the runs' median CPU ns per I/O, as
(max - min) / min. Usage: agree.py DIR1/kernel.json DIR2/kernel.json ..."""
import json, sys
runs = [json.load(open(p)) for p in sys.argv[1:]]
key = lambda r: (r["dvma"], r["completion"], r["workload"], r["depth"])
meds = {}
for j in runs:
    for r in j["results"]:
        meds.setdefault(key(r), []).append(r["cpu_ns_per_io"]["median"])
rows = sorted(((max(v) / min(v) - 1, k, v) for k, v in meds.items() if len(v) == len(runs)), reverse=True)
within = sum(1 for d, _, _ in rows if d <= 0.10)
print(f"{len(runs)} runs, {len(rows)} pairs x workloads: {within} agree within 10% (max/min - 1 of the runs' medians)")
print(f"median spread {sorted(d for d, _, _ in rows)[len(rows)//2]*100:.1f}%, worst {rows[0][0]*100:.1f}%")
for d, k, v in rows[:12]:
    print(f"  {d*100:5.1f}%  {'/'.join(map(str, k[:2]))} {k[2]} qd{k[3]}: " + ", ".join(f"{x:.0f}" for x in v))
