#!/usr/bin/env bash
# The test command: sets the machine up (packaging/setup-dev.sh), then lints, type-checks
# and runs every test tier this machine supports. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/setup-dev.sh
VENV=${LLMUX_VENV:-$PWD/.venv}
echo "== ruff"; "$VENV/bin/ruff" check service shim tests
echo "== mypy (strict)"; "$VENV/bin/mypy" service shim
echo "== pytest"
# Tiers that must run (not skip) here: a skip of one of them fails the run in CI.
export LLMUX_REQUIRE_TIERS=${LLMUX_REQUIRE_TIERS:-criu,dbus}
exec "$VENV/bin/pytest" -ra "$@"
