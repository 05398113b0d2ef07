#!/usr/bin/python3
"""Plots the main panels of deploy/monitoring/dashboards/peer-pods.json from a Prometheus.

Usage: dashboard-picture.py PROMETHEUS_URL   (writes $DASHBOARD_PNG, default dashboard.png)

Each panel's own PromQL (Grafana's $__rate_interval as 10s: the demo scrapes every second)
is evaluated with query_range over everything the Prometheus holds, one point a second, and
drawn with the panel's legend format. Run by scripts/dashboard-picture.sh before its teardown.
"""
import datetime
import json
import os
import re
import sys
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANELS = [
    "Peer pods by phase",
    "VM slots per node: in use vs limit",
    "VM create latency",
    "VM creates and deletes by result",
    "Webhook admissions by outcome",
    "Webhook admission latency",
]


def get(url, path, **params):
    q = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}{path}?{q}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


def legend(fmt, metric):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt) or str(metric)


def main():
    url = sys.argv[1].rstrip("/")
    out = os.environ.get("DASHBOARD_PNG", "dashboard.png")
    with open(os.path.join(ROOT, "deploy/monitoring/dashboards/peer-pods.json")) as f:
        dash = json.load(f)
    panels = {p["title"]: p for p in dash["panels"] if p.get("type") != "row"}
    start = get(url, "/api/v1/status/runtimeinfo")["startTime"]
    t0 = datetime.datetime.fromisoformat(start[:19] + "+00:00").timestamp()
    end = time.time()
    fig, axes = plt.subplots(3, 2, figsize=(14, 11), sharex=True)
    for ax, title in zip(axes.flat, PANELS):
        panel = panels[title]
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        drawn = 0
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", "10s")
            data = get(url, "/api/v1/query_range", query=expr, start=t0, end=end, step="1s")
            for series in data["result"]:
                xs = [float(v[0]) - t0 for v in series["values"]]
                ys = [float(v[1]) for v in series["values"]]
                ax.plot(xs, ys, label=legend(t.get("legendFormat", ""), series["metric"]))
                drawn += 1
        ax.set_title(title)
        ax.set_xlim(0, end - t0)
        ax.set_xlabel("seconds since the operator started")
        ax.set_ylabel({"s": "seconds", "ops": "per second", "reqps": "requests per second"}.get(unit, ""))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("sandboxd: peer pods — a local run (3 kata-remote replicas, VM limit 2), scraped every second")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=90)
    print(f"dashboard: wrote {out}")


if __name__ == "__main__":
    main()
