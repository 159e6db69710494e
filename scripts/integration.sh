#!/usr/bin/env bash
# Integration tests against real servers: a Prefect server (schedules, deployments) and an MLflow
# tracking server on PostgreSQL. Slow (~10-20 min on 2 cores); `make test` skips them.
#   bash scripts/integration.sh            # from the repo root; installs what it needs
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false \
       HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# PostgreSQL from Debian's package (the test itself runs a throw-away cluster on loopback).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL missing and not root: the PostgreSQL test will be skipped" >&2
  fi
fi
make venv >/dev/null
.venv/bin/python -m pip install -q -c requirements.lock -e ".[ops]"
exec .venv/bin/python -m pytest -m integration tests/integration -q -p no:cacheprovider "$@"
