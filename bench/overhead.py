"""Median tokens/s of steps 4-12 of each tree in bench/gpu.sh overhead's output, and the ratio.
    python bench/overhead.py $OUT/overhead.txt"""
import re
import statistics
import sys

runs = {}
for line in open(sys.argv[1]):
    tree, step, rate = re.match(r"(\S+) round \d+: step (\d+)/\d+ .*?\| ([\d,]+) tokens/s", line).groups()
    if int(step) >= 4:
        runs.setdefault(tree, []).append(float(rate.replace(",", "")))
medians = {tree: statistics.median(rates) for tree, rates in runs.items()}
for tree, median in medians.items():
    print(f"{tree}: median {median:,.0f} tokens/s over {len(runs[tree])} steps")
if len(medians) == 2:
    this, base = medians["."], medians[".device/base"]
    print(f"this tree / base: {this / base:.4f} ({(base / this - 1) * 100:+.2f}% time per step)")
