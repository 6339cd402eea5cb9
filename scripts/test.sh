#!/usr/bin/env bash
# The test command: installs what is missing, starts PostgreSQL, runs lint, types and every
# test (unit, API on SQLite and PostgreSQL, end-to-end with real OpenVPN in namespaces).
# Extra arguments go to pytest. Needs root (network namespaces, iptables).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
VPNFLEET_TEST_PG_URL=$(./scripts/pg-test-server.sh | tail -n1)
export VPNFLEET_TEST_PG_URL
echo "== ruff"
.venv/bin/ruff check src tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# pytest exits 5 when it collected no test: that is a failure here, and set -e keeps it one.
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
