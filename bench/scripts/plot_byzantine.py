#!/usr/bin/env python3
"""Render bench/results/byzantine-latency.csv as an SVG line plot (no third-party modules):
p50 latency of one writing client versus connected clients, one line per stability and no-op
interval. Usage: bench/scripts/plot_byzantine.py [CSV] [SVG]"""
import csv
import math
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "bench/results/byzantine-latency.csv"
dst = sys.argv[2] if len(sys.argv) > 2 else "docs/byzantine-latency.svg"
series = {}
with open(src) as f:
    for row in csv.DictReader(f):
        try:
            key = f"{row['stability']}, no-op every {row['noop_interval_ms']} ms"
            point = (int(row["connected"]), float(row["p50_ms"]), float(row["p99_ms"]))
            if math.isnan(point[1]) or float(row["ops_per_sec"]) == 0:  # nothing completed
                continue
            series.setdefault(key, []).append(point)
        except (KeyError, ValueError):
            continue
if not series:
    sys.exit(f"{src}: no rows")
W, H, L, R, T, B = 760, 440, 70, 250, 30, 50
xs = sorted({x for s in series.values() for x, _, _ in s})
ymax = max(y for s in series.values() for _, y, _ in s) * 1.1 or 1
lx = lambda x: L + (math.log2(x) - math.log2(xs[0])) / max(1e-9, math.log2(xs[-1]) - math.log2(xs[0])) * (W - L - R)
ly = lambda y: H - B - y / ymax * (H - T - B)
colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{L}" y="18" font-size="14">Byzantine t=1: p50 latency of one writer vs connected clients</text>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{(L+W-R)/2}" y="{H-12}" text-anchor="middle">connected clients (log scale)</text>',
       f'<text x="16" y="{(T+H-B)/2}" transform="rotate(-90 16 {(T+H-B)/2})" text-anchor="middle">p50 ms</text>']
for x in xs:
    out.append(f'<text x="{lx(x):.1f}" y="{H-B+16}" text-anchor="middle">{x}</text>')
for i in range(6):
    y = ymax * i / 5
    out.append(f'<text x="{L-6}" y="{ly(y)+4:.1f}" text-anchor="end">{y:.0f}</text>')
    out.append(f'<line x1="{L}" y1="{ly(y):.1f}" x2="{W-R}" y2="{ly(y):.1f}" stroke="#eee"/>')
for i, (name, pts) in enumerate(sorted(series.items())):
    c = colors[i % len(colors)]
    pts.sort()
    path = " ".join(f"{lx(x):.1f},{ly(y):.1f}" for x, y, _ in pts)
    out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
    for x, y, _ in pts:
        out.append(f'<circle cx="{lx(x):.1f}" cy="{ly(y):.1f}" r="3" fill="{c}"/>')
    out.append(f'<rect x="{W-R+15}" y="{T+20*i}" width="12" height="12" fill="{c}"/>')
    out.append(f'<text x="{W-R+32}" y="{T+10+20*i}">{name}</text>')
out.append("</svg>")
with open(dst, "w") as f:
    f.write("\n".join(out) + "\n")
print(f"wrote {dst}")
