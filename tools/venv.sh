#!/usr/bin/env bash
# tools/venv.sh DIR PYTHON LOCKFILE: make the venv DIR with PYTHON holding exactly the pins of
# LOCKFILE (pip --no-deps: nothing outside the pinned set), unless its stamp (a copy of the lock)
# says it does already. A changed lock recreates the venv, so no package of an older lock stays.
set -euo pipefail
dir=$1 python=$2 lock=$3
if [ -x "$dir/bin/python" ] && cmp -s "$lock" "$dir/.longattn-lock"; then
  echo "venv $dir: up to date with $lock"
  exit 0
fi
rm -rf "$dir"
"$python" -m venv "$dir"
"$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$lock"
cp "$lock" "$dir/.longattn-lock"
