#!/usr/bin/env bash
# Mutation testing of the agent's decision code, on demand (not in CI: it takes minutes).
# It changes the code one small way at a time (a < becomes <=, a True becomes False, a call
# is dropped...) and runs the fast tests against each change: a change no test notices is a
# behaviour nothing pins down. Surviving mutants and the reason each one is left are listed
# in docs/testing.md. Extra arguments go to `mutmut run` (e.g. a mutant name to retry one).
#
#   ./scripts/mutation.sh            # all decision modules (see [tool.mutmut] in pyproject)
#   .venv/bin/mutmut results         # afterwards: the survivors
#   .venv/bin/mutmut show NAME       # the diff of one
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/pip install -q -e '.[mutation]'
rm -rf mutants
.venv/bin/mutmut run "$@"
.venv/bin/mutmut results
