#!/usr/bin/env bash
# Checks deploy/monitoring with Prometheus' own tools: `promtool check rules` on the rule
# groups of the PrometheusRule, then `promtool test rules` on the alert tests in
# deploy/monitoring/tests/ (series in, alerts out), and that the dashboard is JSON.
# That every metric they use is exported is an integration test
# (monitoring::every_metric_of_the_dashboard_and_the_alerts_is_exported_live).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v promtool >/dev/null || { echo "promtool missing: run scripts/bootstrap.sh" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The PrometheusRule's `spec:` is a Prometheus rules file, indented by two spaces.
awk 'found { sub(/^  /, ""); print } /^spec:/ { found = 1 }' \
  deploy/monitoring/prometheus-rule.yaml > "$work/sandboxd.rules.yaml"
promtool check rules "$work/sandboxd.rules.yaml"
for t in deploy/monitoring/tests/*.yaml; do
  cp "$t" "$work/"
  (cd "$work" && promtool test rules "$(basename "$t")")
done
jq empty deploy/monitoring/dashboards/peer-pods.json \
  || { echo "deploy/monitoring/dashboards/peer-pods.json is not JSON" >&2; exit 1; }
# Every alert links a runbook section that exists.
grep -o 'runbook_url: docs/runbooks.md#[a-z0-9-]*' deploy/monitoring/prometheus-rule.yaml | sed 's/.*#//' |
  while read -r anchor; do
    grep -qi "^## ${anchor}\$" <(sed 's/^## \(.*\)/## \L\1/' docs/runbooks.md) \
      || { echo "runbook section #$anchor missing from docs/runbooks.md" >&2; exit 1; }
  done
[ "$(grep -c 'runbook_url:' deploy/monitoring/prometheus-rule.yaml)" = "$(grep -c '^  *- alert:' deploy/monitoring/prometheus-rule.yaml)" ] \
  || { echo "an alert lacks its runbook_url" >&2; exit 1; }
echo "monitoring: rules, alert tests, runbook links and dashboard check out"
