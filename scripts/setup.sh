#!/usr/bin/env bash
# Set up everything codestation needs on a Debian/Ubuntu machine, idempotently: system packages,
# a running Docker engine where one can run (else sessions use bubblewrap), the Python
# environment, the pinned OpenCode from npm and the sandbox image. Safe to run again: each step
# skips what is done. CODESTATION_NO_DOCKER=1 leaves Docker alone.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# -- system packages ---------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v pasta >/dev/null || need+=(passt)          # a bwrap sandbox's own network
command -v iptables >/dev/null || need+=(iptables)    # what sandboxes may reach
[ -x /usr/bin/chromium ] || need+=(chromium)  # the UI's browser tests
command -v npm >/dev/null || need+=(npm)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# -- the Docker engine (sessions fall back to bubblewrap where it cannot run) -----------------------
if [ "${CODESTATION_NO_DOCKER:-}" = 1 ]; then
  say "CODESTATION_NO_DOCKER=1: not starting Docker"
elif ! docker info >/dev/null 2>&1; then
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    say "starting Docker with systemd"
    as_root systemctl start docker
  else
    say "starting dockerd (log: /var/log/dockerd.log)"
    as_root sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  fi
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || say "dockerd did not come up (see /var/log/dockerd.log); sessions will use bubblewrap"
fi

# -- Python environment --------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  say "installing codestation into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.installed
fi

# -- the web UI's front-end packages (xterm.js), from package-lock.json ---------------------------
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing the web UI's packages"
  npm ci --no-audit --no-fund --silent
fi

# -- the sandbox image (Docker) and the pinned OpenCode (both runtimes) ---------------------------
say "preparing the runtimes"
.venv/bin/codestation prepare
