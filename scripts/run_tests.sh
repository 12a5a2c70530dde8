#!/usr/bin/env bash
# Command 2: set up and run the test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LIVERLESIONAI_HOME="$(mktemp -d)"  # the registry must not touch the user's models
.venv/bin/python -m pytest -q "$@"
