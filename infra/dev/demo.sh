#!/usr/bin/env bash
# Install (see install.sh) and run the main job on embedded defaults: `uss demo` (the whole
# pipeline on the demo corpus, on a local Ray, tracked in a local MLflow store under ./workspace).
# Extra arguments go to `uss demo`, e.g.  infra/dev/demo.sh --quick
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/dev/install.sh
export USS_METADATA_DIR=${USS_METADATA_DIR:-$(cd .. && pwd)/shared/audioset}
exec .venv/bin/uss demo "$@"
