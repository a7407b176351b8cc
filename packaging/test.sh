#!/usr/bin/env bash
# The test command: sets the machine up (packaging/setup-dev.sh), then lints, type-checks
# and runs every test tier this machine supports. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/setup-dev.sh
VENV=${LLMUX_VENV:-$PWD/.venv}
echo "== ruff"; "$VENV/bin/ruff" check common service client shim tests
echo "== mypy (strict)"
# mypy resolves llmux.* through a tree of links, as the wheel lays the packages out.
types_root=$(mktemp -d); trap 'rm -rf "$types_root"' EXIT
mkdir "$types_root/llmux"; for _n in common service client shim; do ln -s "$PWD/$_n" "$types_root/llmux/$_n"; done
MYPYPATH="$types_root" "$VENV/bin/mypy" --namespace-packages --explicit-package-bases -p llmux.common -p llmux.service -p llmux.client -p llmux.shim
echo "== pytest"
# Tiers that must run (not skip) here: a skip of one of them fails the run in CI.
export LLMUX_REQUIRE_TIERS=${LLMUX_REQUIRE_TIERS:-criu,dbus,podman,systemd,vllm,browser,s3}
"$VENV/bin/pytest" -ra "$@"
