#!/usr/bin/env bash
# An MLflow tracking server whose artifacts live on S3, for jobs on a cluster:
#
#   MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/mlflow infra/mlflow/server.sh
#   export MLFLOW_TRACKING_URI=http://HOST:5000      # on the machine that submits, and in the jobs
#
# The server proxies artifacts (clients log to mlflow-artifacts:/ through it), so jobs need no S3
# credentials for MLflow; the server itself uses the standard AWS environment (instance profile,
# AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), and MLFLOW_S3_ENDPOINT_URL for a non-AWS S3 API
# (MinIO, or a local test server). Settings (environment):
#   MLFLOW_ARTIFACTS_DESTINATION  required: s3://bucket/prefix for run artifacts and models
#   MLFLOW_BACKEND_STORE_URI      runs, params, metrics (default: SQLite in ./mlflow-server/;
#                                 use postgresql://... for several servers or heavy use)
#   MLFLOW_HOST / MLFLOW_PORT     listen address (default 0.0.0.0:5000)
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_SERVER_ALLOWED_HOSTS   (read by mlflow itself) Host headers it answers, comma-separated,
#                                 wildcards allowed; the default is localhost and private IPs
#                                 only, so a server reached by a DNS name needs it, e.g.
#                                 "mlflow.example.com*,mlflow.mlflow.svc.cluster.local*"
# Needs the project's environment (mlflow and boto3 come with `pip install .`): run it from the
# venv, or in the image: docker run -p 5000:5000 -e MLFLOW_ARTIFACTS_DESTINATION=... IMAGE infra/mlflow/server.sh
set -euo pipefail
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/prefix}"
STATE_DIR=${MLFLOW_STATE_DIR:-$PWD/mlflow-server}
mkdir -p "$STATE_DIR"
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE_DIR/mlflow.db}
MLFLOW=${MLFLOW_BIN:-mlflow}
if ! command -v "$MLFLOW" >/dev/null; then
    # From a checkout whose ./.venv was made by infra/dev/install.sh.
    MLFLOW="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/mlflow"
fi
exec "$MLFLOW" server \
    --backend-store-uri "$BACKEND" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}"
