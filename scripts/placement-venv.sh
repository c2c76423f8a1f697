#!/usr/bin/env bash
# Creates (once) the Python venv that runs the real OpenStack Placement
# service for the fleet tests: openstack-placement and gunicorn from PyPI,
# PyMySQL for the MariaDB-backed runs. Prints the venv's path.
#
# Location: $SEVPLACE_PLACEMENT_VENV, else $XDG_CACHE_HOME/sevplace/placement-venv
# (~/.cache/sevplace/placement-venv). A venv whose marker names other
# versions is rebuilt. About 40 s the first time, nothing afterwards.
set -euo pipefail

REQUIREMENTS=(openstack-placement==16.0.0 gunicorn==27.0.1 PyMySQL==1.2.4)
venv="${SEVPLACE_PLACEMENT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sevplace/placement-venv}"
marker="$venv/.sevplace-requirements"
want="${REQUIREMENTS[*]}"

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] && [ -x "$venv/bin/gunicorn" ]; then
  echo "$venv"
  exit 0
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}" >&2
echo "$want" > "$marker"
echo "$venv"
