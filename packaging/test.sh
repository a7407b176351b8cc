#!/usr/bin/env bash
# The test command: sets the machine up (packaging/setup-dev.sh), then lints, type-checks
# and runs every test tier this machine supports. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The run needs room: about 5 GiB for the two virtualenvs, 2 GiB more at its peak for
# checkpoint images, models and podman's containers (7.1 GiB measured from a clean clone).
# A full disk otherwise shows up as hundreds of unrelated errors; say it once, by name.
need_gib=${LLMUX_TEST_DISK_GIB:-8}
for where in "$PWD" "${TMPDIR:-/tmp}"; do
    free_gib=$(df -P -BG "$where" | awk 'NR == 2 { sub("G", "", $4); print $4 }')
    if [ "${free_gib:-0}" -lt "$need_gib" ]; then
        echo "test.sh: $where has ${free_gib:-0} GiB free; the tests need about $need_gib GiB" \
             "(LLMUX_TEST_DISK_GIB sets the bound)" >&2
        exit 1
    fi
done
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
