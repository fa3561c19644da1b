#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Summarise a CSV of temperature readings per station: the example job for the Debian image.

    python3 stats.py data.csv      # prints a line per station, writes summary.json
"""

import csv
import json
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    readings = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            readings[row["station"]].append(float(row["celsius"]))
    summary = {}
    for station in sorted(readings):
        values = readings[station]
        summary[station] = {"n": len(values), "mean": round(statistics.mean(values), 2),
                            "median": statistics.median(values), "min": min(values), "max": max(values)}
        print(f"{station:<10} n={len(values):<4} mean={summary[station]['mean']:6.2f} "
              f"min={min(values):6.1f} max={max(values):6.1f}", flush=True)
    with open("summary.json", "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    print(f"python {sys.version.split()[0]}: {sum(s['n'] for s in summary.values())} readings", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
