#!/usr/bin/env bash
# Builds the OLM bundle validator: a small Go program written here that runs the operator
# framework's own validators (Go module github.com/operator-framework/api) on a bundle
# directory — the default bundle validators (CSV, CRDs, bundle), the OperatorHub suite
# (OperatorHub v2, standard categories, standard capabilities) and good practices — the
# checks `operator-sdk bundle validate --select-optional suite=operatorframework` runs.
#
# Output: $SANDBOXD_CACHE/olm-validator/api-$OLM_API_VERSION/bin/olm-validate (default
# cache: ~/.cache/sandboxd). A warm cache returns at once. Prints the binary's path on
# stdout as its last line.
#
#   scripts/olm-validator.sh                 build (once) and print the path
#   scripts/olm-validator.sh --run DIR       build (once) and validate the bundle in DIR
set -euo pipefail

OLM_API_VERSION="${OLM_API_VERSION:-v0.43.0}"
CACHE="${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}"
DEST="$CACHE/olm-validator/api-$OLM_API_VERSION"
BIN="$DEST/bin/olm-validate"

log() { printf '[olm-validator] %s\n' "$*" >&2; }

build() {
  command -v go >/dev/null || { log "the go command is required"; exit 1; }
  local start work
  start=$(date +%s)
  work="$DEST/src"
  mkdir -p "$work" "$DEST/bin"
  cd "$work"
  cat > go.mod <<GOMOD
module sandboxd.test/olmvalidate

go 1.26

require github.com/operator-framework/api $OLM_API_VERSION
GOMOD
  cat > main.go <<'GO'
// olm-validate DIR [K8S_VERSION]: validates the OLM bundle in DIR (manifests/ and
// metadata/) with the operator framework's validators. Prints every finding; exits 1 on
// any error or warning, 2 when the bundle cannot be loaded at all.
package main

import (
	"fmt"
	"os"

	"github.com/operator-framework/api/pkg/manifests"
	"github.com/operator-framework/api/pkg/validation"
	verrors "github.com/operator-framework/api/pkg/validation/errors"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: olm-validate BUNDLE_DIR [K8S_VERSION]")
		os.Exit(2)
	}
	bundle, err := manifests.GetBundleFromDir(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "loading the bundle: %v\n", err)
		os.Exit(2)
	}
	objs := bundle.ObjectsToValidate()
	if len(os.Args) > 2 {
		objs = append(objs, map[string]string{"k8s-version": os.Args[2]})
	}
	validators := validation.DefaultBundleValidators.WithValidators(
		validation.OperatorHubV2Validator,
		validation.StandardCategoriesValidator,
		validation.StandardCapabilitiesValidator,
		validation.GoodPracticesValidator,
	)
	errs, warns := 0, 0
	for _, r := range validators.Validate(objs...) {
		for _, e := range r.Errors {
			errs++
			fmt.Printf("ERROR %s: %s\n", r.Name, e.Error())
		}
		for _, w := range r.Warnings {
			if w.Level == verrors.LevelWarn {
				warns++
			}
			fmt.Printf("WARNING %s: %s\n", r.Name, w.Error())
		}
	}
	fmt.Printf("bundle %s (CSV %s, %d CRDs): %d errors, %d warnings\n",
		os.Args[1], bundle.CSV.GetName(), len(bundle.V1CRDs), errs, warns)
	if errs+warns > 0 {
		os.Exit(1)
	}
}
GO
  log "go mod tidy (github.com/operator-framework/api $OLM_API_VERSION)"
  GOFLAGS=-mod=mod go mod tidy >/dev/null 2>tidy.log || { cat tidy.log >&2; exit 1; }
  log "building olm-validate"
  CGO_ENABLED=0 go build -p "${GO_JOBS:-2}" -trimpath -ldflags "-s -w" -o "$BIN.tmp" .
  mv "$BIN.tmp" "$BIN"
  log "built in $(( $(date +%s) - start ))s at $BIN"
}

[ -x "$BIN" ] || build

if [ "${1:-}" = "--run" ]; then
  shift
  exec "$BIN" "$@"
fi
echo "$BIN"
