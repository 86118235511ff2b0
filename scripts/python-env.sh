#!/usr/bin/env bash
# Creates the virtualenv of the Python participant example (examples/python) unless it is already
# there with the pinned requirements, and prints the path of its python. Logs go to stderr.
#
#   scripts/python-env.sh                              # prints e.g. /repo/target/python-venv/bin/python
#   export PARTICIPANT_PYTHON="$(bash scripts/python-env.sh)"
#
# tests/integration/python_participant.rs runs the participant with $PARTICIPANT_PYTHON (else
# target/python-venv/bin/python). The variable is not named SAGAFLOW_*: a node reads every
# SAGAFLOW_* variable as a setting and refuses unknown ones.
#
# Needs python3 with venv and pip (Debian: apt-get install python3-venv) and PyPI. Set
# PYTHON_VENV to put the virtualenv elsewhere, PYTHON to use another interpreter.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PYTHON_VENV:-$root/target/python-venv}"
requirements="$root/examples/python/requirements.txt"
python="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "$wanted" ]] &&
    "$venv/bin/python" -c "import nats, google.protobuf, grpc_tools" 2>/dev/null; then
    echo "$venv/bin/python"
    exit 0
fi

if ! "$python" -c "import venv, ensurepip" 2>/dev/null; then
    echo "error: $python cannot create a virtualenv (Debian: apt-get install python3-venv)" >&2
    exit 1
fi
echo "creating the Python participant's virtualenv in $venv" >&2
# --clear: a virtualenv left by an older interpreter or an interrupted install starts over.
"$python" -m venv --clear "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
"$venv/bin/python" -c "import nats, google.protobuf, grpc_tools" >&2
echo "$wanted" >"$stamp"
echo "$venv/bin/python"
