#!/bin/sh
# Install codestation as a systemd service on this host (run as root):
#
#   deploy/systemd/install.sh WHEEL [MORE PIP ARGUMENTS]
#
# WHEEL: the codestation wheel to install (`python -m build` makes it), or any pip argument
# naming codestation; pip runs as root here, so name exactly what you mean to install. Makes a
# virtual environment at /opt/codestation, the unit, its user with its state and cache
# directories, and /etc/codestation/config.toml (kept if it exists). Then: edit the
# configuration, get OpenCode and the sandbox image ready (`codestation prepare`, as the
# service's user) and start it: the README's "As a system service" shows each command.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run it as root" >&2; exit 1; }
[ $# -gt 0 ] || { echo "usage: install.sh WHEEL [PIP ARGUMENTS]" >&2; exit 2; }
python3 -m venv /opt/codestation
/opt/codestation/bin/pip install --quiet --upgrade "$@"
install -D -m 644 "$here/codestation.sysusers" /etc/sysusers.d/codestation.conf
systemd-sysusers /etc/sysusers.d/codestation.conf
# As the unit makes them (StateDirectory, CacheDirectory): `prepare` runs before its first start.
install -d -o codestation -g codestation -m 700 /var/lib/codestation /var/cache/codestation
# Readable by the service alone: it may hold metrics_token or a secret's file name.
[ -e /etc/codestation/config.toml ] \
  || install -D -m 640 -g codestation "$here/config.toml" /etc/codestation/config.toml
install -D -m 644 "$here/codestation.service" /etc/systemd/system/codestation.service
systemctl daemon-reload
echo "installed: /opt/codestation, codestation.service, /etc/codestation/config.toml" >&2
