#!/usr/bin/env bash
# Runs the test suite. Real services (PostgreSQL, gunicorn) are started by the
# session fixtures in tests/conftest.py, which skip locally when a component is
# missing and fail under CI=true.
set -uo pipefail
cd "$(dirname "$0")/.."
# One process per core (2 to 4), each taking whole test files (--dist loadfile:
# a file's fixtures and servers stay in one process). Most tests wait on
# gunicorn, Docker or a VM rather than compute, so even two cores finish the
# suite in about two thirds of the serial time. Files go out in the order
# tests/conftest.py sorts them (the real-VM file first: started last, it was a
# 15-minute tail with the other process idle), not xdist's by-test-count order.
# PYTEST_WORKERS=0 runs serially.
workers=${PYTEST_WORKERS:-$(nproc)}
((workers > 4)) && workers=4
((workers < 2 && workers != 0)) && workers=2
if ((workers > 0)); then
    pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
else
    pytest "$@"
fi
rc=$?
# pytest exits 5 when it collected nothing: that is a failure for us too.
exit $rc
