#!/usr/bin/env bash
# codestation's own image (deploy/Dockerfile), from this checkout, in the host's Docker engine;
# prints its tag. `scripts/image.sh [TAG]` (default codestation:local).
#
# Its base is the one the sandbox image uses: Debian's where a registry answers, else the one
# codestation makes with debootstrap (`make setup` makes it). The build context holds wheels/:
# codestation's wheel (the web UI's front-end files in it) and every dependency's, fetched here,
# where pip reaches the package index; the build itself needs no network.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=${1:-codestation:local}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

base=debian:bookworm-slim
docker image inspect "$base" >/dev/null 2>&1 || docker pull -q "$base" >/dev/null 2>&1 \
  || base=codestation-base:bookworm
context=$(mktemp -d /var/tmp/codestation-image.XXXXXX)
trap 'rm -rf "$context"' EXIT
say "building codestation's wheel (the web UI's front-end files in it)"
"$ROOT/.venv/bin/python" -m build -q --wheel --outdir "$context/wheels" "$ROOT" >/dev/null
say "fetching its dependencies as wheels"
"$ROOT/.venv/bin/pip" wheel -q --wheel-dir "$context/wheels" "$context"/wheels/codestation-*.whl
say "building $TAG on $base"
docker build -q -f "$ROOT/deploy/Dockerfile" --build-arg "BASE=$base" -t "$TAG" "$context" >/dev/null
echo "$TAG"
