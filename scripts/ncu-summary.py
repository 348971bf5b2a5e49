#!/usr/bin/env python3
"""Per-kernel means of an `ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum` log:
   python3 scripts/ncu-summary.py ncu.log   (kernel, launches, mean us, mean MB read, total us)"""
import re, sys
from collections import defaultdict

stats = defaultdict(lambda: [0, 0.0, 0.0])
name = None
scale = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}
tscale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "nsecond": 1e-3}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"^  (\S+) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context", line)
    if m:
        name = m.group(1)
        stats[name][0] += 1
        continue
    m = re.match(r"^\s+(dram__bytes_read\.sum|gpu__time_duration\.sum)\s+(\S+)\s+([\d.,]+)", line)
    if m and name:
        v = float(m.group(3).replace(",", ""))
        if m.group(1).startswith("gpu"):
            stats[name][1] += v * tscale.get(m.group(2), 1.0)
        else:
            stats[name][2] += v * scale.get(m.group(2), 1.0)
tot = 0.0
for k, (n, t, b) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
    tot += t
    print(f"{k:40s} n={n:4d} mean {t / n:8.2f} us  {b / n:8.2f} MB  total {t:9.1f} us")
print(f"total {tot:.1f} us")
