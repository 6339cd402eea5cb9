#!/usr/bin/env bash
# Start the machine's PostgreSQL (no systemd here) and make a test role that may create
# databases. Prints the admin URL the API tests use (VPNFLEET_TEST_PG_URL).
set -euo pipefail
ver=$(ls /usr/lib/postgresql | sort -V | tail -n1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -q "^$ver main$"; then
  pg_createcluster "$ver" main >/dev/null
fi
if ! pg_lsclusters -h | awk '$1=="'"$ver"'" && $2=="main" {print $4}' | grep -q online; then
  pg_ctlcluster "$ver" main start
fi
for _ in $(seq 1 50); do
  su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 0.2
done
port=$(pg_lsclusters -h | awk '$1=="'"$ver"'" && $2=="main" {print $3}')
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='vpnfleet_test'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"CREATE ROLE vpnfleet_test LOGIN CREATEDB PASSWORD 'vpnfleet_test'\""
# DROP DATABASE ... WITH (FORCE) in the test fixtures may have to end an autovacuum worker.
su postgres -c "psql -qc 'GRANT pg_signal_backend TO vpnfleet_test'" >/dev/null
echo "postgresql+psycopg://vpnfleet_test:vpnfleet_test@127.0.0.1:${port}/postgres"
