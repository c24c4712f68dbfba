#!/usr/bin/env bash
# Build the image and run the container test, failing (not skipping) when no engine can be had.
#
#   scripts/container-test.sh                                          # the shipped model in model_artifacts/
#   SENTIMENT_CONTAINER_ARTIFACTS=/path/to/artifacts scripts/container-test.sh    # another model, mounted
#   scripts/container-test.sh -k sigterm                               # extra arguments go to pytest
#
# On this kind of machine the engine is podman from ../shared/tools/container-engine.sh (installed and
# set up on first use, about 2 minutes); elsewhere a working docker or podman.
set -euo pipefail
cd "$(dirname "$0")/.."
script=${CONTAINER_ENGINE_SCRIPT:-../shared/tools/container-engine.sh}
if [[ -f $script ]]; then
  # shellcheck disable=SC1090
  source "$script"   # set up once here, so the test's own sourcing takes seconds
  set +u
fi
SENTIMENT_REQUIRE_CONTAINER=1 exec python -m pytest tests/test_container.py -v "$@"
