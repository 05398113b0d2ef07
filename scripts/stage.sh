#!/usr/bin/env bash
# stage.sh NAME COMMAND...: runs one stage of `make test`, printing its duration.
set -uo pipefail
name=$1; shift
start=$(date +%s.%N)
printf '\n==> %s\n' "$name" >&2
"$@"
rc=$?
end=$(date +%s.%N)
printf '<== %s: %s in %.1fs\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)")" \
  "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')" >&2
exit $rc
