#!/usr/bin/env bash
# Runs the test suite. Real services (PostgreSQL, gunicorn) are started by the
# session fixtures in tests/conftest.py, which skip locally when a component is
# missing and fail under CI=true.
set -uo pipefail
cd "$(dirname "$0")/.."
pytest "$@"
rc=$?
# pytest exits 5 when it collected nothing: that is a failure for us too.
exit $rc
