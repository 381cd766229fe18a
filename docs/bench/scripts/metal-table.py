#!/usr/bin/env python3
"""docs/bench/metal.md's tables: `dvma metal bench kernel --json` output
(one or more files, e.g. without and with --iommu vtd) beside the Linux
process's `dvma bench kernel` (docs/bench/kernel/kernel.json), one table
per workload, as Markdown on stdout.

    python3 docs/bench/scripts/metal-table.py docs/bench/kernel/kernel.json \
        none=docs/bench/metal/none.json vtd=docs/bench/metal/vtd.json
"""
import json
import sys


def main():
    linux = json.load(open(sys.argv[1]))
    metal = []
    for arg in sys.argv[2:]:
        label, path = arg.split("=", 1)
        metal.append((label, json.load(open(path))))
    lin = {}
    for r in linux["results"]:
        lin[(r["dvma"], r["completion"], r["workload"], r["depth"])] = r
    workloads = [(w["workload"], w["depth"]) for w in metal[0][1]["pairs"][0]["workloads"]]
    for wl, depth in workloads:
        print(f"### {wl} qd{depth}\n")
        head = ["pair", "Linux CPU ns/I/O", "Linux intr/I/O", "Linux switch/I/O"]
        for label, _ in metal:
            head += [
                f"metal {label}: IOPS (TCG)",
                f"CPU ns/I/O (TCG)",
                "intr/I/O",
                "switch/I/O",
            ]
            if label != "none":
                head.append("VT-d inval/I/O")
        head.append("DVMA pages peak/reserved (metal)")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for p in metal[0][1]["pairs"]:
            key = (p["dvma"], p["completion"])
            row = [f'{key[0]}/{key[1]}']
            l = lin.get(key + (wl, depth))
            if l:
                row += [
                    f'{l["cpu_ns_per_io"]["median"]:.0f}',
                    f'{l["intrs_per_io"]["median"]:.2f}',
                    f'{l["switches_per_io"]["median"]:.2f}',
                ]
            else:
                row += ["-", "-", "-"]
            pages = "-"
            for label, m in metal:
                mp = next(
                    (x for x in m["pairs"] if (x["dvma"], x["completion"]) == key), None
                )
                w = mp and next(
                    (x for x in mp["workloads"] if (x["workload"], x["depth"]) == (wl, depth)),
                    None,
                )
                if not w:
                    row += ["-"] * (5 if label != "none" else 4)
                    continue
                row += [
                    f'{w["iops"]:.0f}',
                    f'{w["cpu_ns_per_io"]:.0f}',
                    f'{w["intrs_per_io"]:.2f}',
                    f'{w["switches_per_io"]:.2f}',
                ]
                if label != "none":
                    row.append(f'{w["vtd_invalidations_per_io"]:.2f}')
                pages = f'{mp["pages_peak"]}/{mp["pages_reserved"]}'
            row.append(pages)
            print("| " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    main()
