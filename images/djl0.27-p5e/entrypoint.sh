#!/usr/bin/env bash
# Entrypoint of djl0.27-p5e: SageMaker runs the container as `docker run <image> serve`.
# Rendered from templates/entrypoint.sh.j2.
set -euo pipefail

if [[ "${1:-}" == "serve" ]]; then
  shift
  # DJL Serving exits with 77 to ask for a restart (e.g. after a model update).
  code=77
  while [[ $code -eq 77 ]]; do
    set +e
    /usr/bin/djl-serving "$@"
    code=$?
    set -e
  done
  exit "$code"
fi
exec "$@"
