#!/usr/bin/env python3
"""Render the JSON results of bench/scripts/sweep.sh (lockstep-bench --json) as SVG plots
(no third-party modules): per result file, throughput versus clients and p99 latency versus
clients, one line per system and operation mix.

Usage: bench/scripts/plot_bench.py [RESULT.json ...]   (default: bench/results/sweep-*.json)
Writes docs/bench-NAME.svg for bench/results/sweep-NAME.json."""
import glob
import json
import math
import os
import sys

COLORS = {"lockstep": ["#1f77b4", "#17becf", "#9467bd", "#2ca02c"], "etcd": ["#d62728", "#ff7f0e", "#8c564b", "#e377c2"]}


def panel(out, x0, series, title, ylabel, ykey, w=420, h=330):
    L, R, T, B = 60, 10, 30, 45
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ymax = max((y for pts in series.values() for _, y in pts), default=1) * 1.1 or 1
    lo, hi = math.log2(xs[0]), math.log2(xs[-1])
    lx = lambda x: x0 + L + (math.log2(x) - lo) / max(1e-9, hi - lo) * (w - L - R)
    ly = lambda y: h - B - y / ymax * (h - T - B)
    out.append(f'<text x="{x0 + w / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>')
    out.append(f'<line x1="{x0 + L}" y1="{h - B}" x2="{x0 + w - R}" y2="{h - B}" stroke="black"/>')
    out.append(f'<line x1="{x0 + L}" y1="{T}" x2="{x0 + L}" y2="{h - B}" stroke="black"/>')
    for x in xs:
        out.append(f'<text x="{lx(x):.1f}" y="{h - B + 16}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{x0 + L + (w - L - R) / 2}" y="{h - 8}" text-anchor="middle">clients (log scale)</text>')
    for i in range(6):
        y = ymax / 1.1 * i / 5
        out.append(f'<text x="{x0 + L - 4}" y="{ly(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
        out.append(f'<line x1="{x0 + L}" y1="{ly(y):.1f}" x2="{x0 + w - R}" y2="{ly(y):.1f}" stroke="#eee"/>')
    out.append(f'<text transform="translate({x0 + 14},{h / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>')
    for (name, color, dash), pts in series.items():
        pts = sorted(pts)
        d = " ".join(f"{lx(x):.1f},{ly(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        for x, y in pts:
            out.append(f'<circle cx="{lx(x):.1f}" cy="{ly(y):.1f}" r="3" fill="{color}"/>')


def plot(src):
    with open(src) as f:
        res = json.load(f)
    runs = res["runs"]
    mixes = list(dict.fromkeys(r["mix"] for r in runs))
    thr, p99 = {}, {}
    for r in runs:
        rep = r["report"]
        system = "etcd" if rep["target"].startswith("etcd") else "lockstep"
        color = COLORS[system][mixes.index(r["mix"]) % 4]
        key = (f"{system}, {r['mix']}", color, "" if system == "lockstep" else "6,3")
        if rep["ok"] == 0:
            continue
        thr.setdefault(key, []).append((rep["clients"], rep["ops_per_sec"]))
        p99.setdefault(key, []).append((rep["clients"], rep["p99_us"] / 1000))
    if not thr:
        sys.exit(f"{src}: no runs")
    size = runs[0]["report"]["value_size"]
    name = os.path.basename(src)[len("sweep-"):-len(".json")] if os.path.basename(src).startswith("sweep-") else os.path.basename(src)[:-5]
    W, H, legend = 860, 330, 22 * len(thr) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + legend}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H + legend}" fill="white"/>']
    panel(out, 0, thr, f"{name}: throughput ({size}-byte values)", "ops/s", "ops")
    panel(out, 430, p99, f"{name}: p99 latency", "ms", "p99")
    for i, (label, color, dash) in enumerate(thr):
        y = H + 10 + 22 * i
        out.append(f'<line x1="70" y1="{y}" x2="110" y2="{y}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        out.append(f'<text x="118" y="{y + 4}">{label}</text>')
    out.append(f'<text x="{W - 10}" y="{H + legend - 6}" text-anchor="end" fill="#666">load at start: {res["machine"]["loadavg_at_start"]}</text>')
    out.append("</svg>")
    dst = f"docs/bench-{name}.svg"
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"{src} -> {dst}")


for src in sys.argv[1:] or sorted(glob.glob("bench/results/sweep-*.json")):
    plot(src)
