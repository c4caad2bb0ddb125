#!/bin/sh
# Install codestation as a systemd service on this host (run as root):
#
#   deploy/systemd/install.sh [PIP ARGUMENTS]
#
# into a virtual environment at /opt/codestation (pip installs PIP ARGUMENTS, by default
# `codestation` from the package index; e.g. a wheel's path), with its unit, its user and
# /etc/codestation/config.toml (kept if it exists). Then: edit the configuration, get OpenCode
# and the sandbox image ready (`codestation prepare`, as the service's user), and start it:
# the README's "Running it as a system service" shows each command.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run it as root" >&2; exit 1; }
[ $# -gt 0 ] || set -- codestation
python3 -m venv /opt/codestation
/opt/codestation/bin/pip install --quiet --upgrade "$@"
install -D -m 644 "$here/codestation.sysusers" /etc/sysusers.d/codestation.conf
systemd-sysusers /etc/sysusers.d/codestation.conf
[ -e /etc/codestation/config.toml ] || install -D -m 644 "$here/config.toml" /etc/codestation/config.toml
install -D -m 644 "$here/codestation.service" /etc/systemd/system/codestation.service
systemctl daemon-reload
echo "installed: /opt/codestation, codestation.service, /etc/codestation/config.toml" >&2
