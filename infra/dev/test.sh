#!/usr/bin/env bash
# Install (see install.sh) and run the test suite. Extra arguments go to pytest, e.g.
#   infra/dev/test.sh -m slow      # the slow set only
#   infra/dev/test.sh -m ''        # everything
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/dev/install.sh
export USS_METADATA_DIR=${USS_METADATA_DIR:-$(cd .. && pwd)/shared/audioset}
exec .venv/bin/python -m pytest "$@"
