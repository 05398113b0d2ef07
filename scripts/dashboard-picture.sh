#!/usr/bin/env bash
# Renders docs/images/dashboard.png from real data: runs the demo (scripts/demo.sh: control
# plane, operator, webhook, CAA with the local provider, a 3-replica kata-remote Deployment
# against a VM limit of 2) with a Prometheus scraping the components every second, then
# plots the main panels of deploy/monitoring/dashboards/peer-pods.json with their own
# queries (scripts/dashboard-picture.py).
#
# Usage: sudo scripts/dashboard-picture.sh [OUT.png]
# Needs what `make demo` needs, plus Debian's prometheus and python3-matplotlib.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/docs/images/dashboard.png}")"
die() { printf 'dashboard-picture: %s\n' "$*" >&2; exit 1; }
command -v prometheus >/dev/null || die "prometheus missing: apt-get install prometheus"
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || die "matplotlib missing: apt-get install python3-matplotlib"
mkdir -p "$(dirname "$OUT")"
export DASHBOARD_PNG="$OUT"
export DEMO_PROMETHEUS="$ROOT/scripts/dashboard-picture.py"
"$ROOT/scripts/demo.sh"
[ -s "$OUT" ] || die "no picture was written"
echo "wrote $OUT"
