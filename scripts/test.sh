#!/usr/bin/env bash
# The test command: set-up (venv, torch CPU, package), lint, then the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup_env.sh
source "$ROOT/scripts/setup_env.sh"
ruff check .
ruff format --check .
python -m pytest "$@"
