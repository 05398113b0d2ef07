#!/usr/bin/env bash
# Sourced by scripts/control-plane.sh and scripts/node.sh: the one wrapper Go module every
# Kubernetes binary of the test world is built from, so the control plane, the kubelet and
# kube-proxy are the same build of the same version.
#
# k8s_module DIR VERSION CMD...: writes DIR/go.mod (requires k8s.io/kubernetes VERSION and
# replaces its staging modules by their published v0.X.Y versions) and DIR/tools.go (imports
# k8s.io/kubernetes/cmd/CMD for each CMD), then `go mod tidy`. Prints nothing on success.
# k8s_ldflags VERSION: the -ldflags that stamp the version into a binary.

k8s_module() {
  local dir=$1 version=$2 cmd
  shift 2
  local minor_patch="${version#v1.}"
  local staging_version="v0.$minor_patch"
  local gomod_file
  gomod_file="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$version.mod"
  mkdir -p "$dir"
  ( cd "$dir" && GOFLAGS=-mod=mod go mod download k8s.io/kubernetes@"$version" >/dev/null )
  [ -f "$gomod_file" ] || { echo "go.mod of k8s.io/kubernetes@$version not found" >&2; return 1; }
  local go_line
  go_line=$(grep -m1 '^go ' "$gomod_file")
  {
    echo "module sandboxd.test/kubernetes"
    echo
    echo "$go_line"
    echo
    echo "require k8s.io/kubernetes $version"
    echo
    echo "replace ("
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/' "$gomod_file" \
      | awk -v v="$staging_version" '{ print "\t" $1 " => " $1 " " v }'
    echo ")"
  } > "$dir/go.mod"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for cmd in "$@"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$cmd"; done
    printf ')\n'
  } > "$dir/tools.go"
  ( cd "$dir" && GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>"$dir/tidy.log" ) \
    || { cat "$dir/tidy.log" >&2; return 1; }
}

k8s_ldflags() {
  local version=$1 minor_patch="${1#v1.}"
  local f="-s -w"
  f+=" -X k8s.io/component-base/version.gitVersion=$version"
  f+=" -X k8s.io/component-base/version.gitMajor=1"
  f+=" -X k8s.io/component-base/version.gitMinor=${minor_patch%%.*}"
  f+=" -X k8s.io/component-base/version.gitTreeState=clean"
  echo "$f"
}
