#!/usr/bin/env bash
# Builds the job images (jobcloud/python, jobcloud/ml) offline; quick when
# nothing changed. Starts the Docker engine first if needed.
# Usage: scripts/build-images.sh [python] [ml]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/docker-up.sh
exec worker/images/build.sh "$@"
