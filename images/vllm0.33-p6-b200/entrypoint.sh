#!/usr/bin/env bash
# Entrypoint of vllm0.33-p6-b200: SageMaker runs the container as `docker run <image> serve`.
# Rendered from templates/entrypoint.sh.j2.
set -euo pipefail

if [[ "${1:-}" == "serve" ]]; then
  shift
  # vLLM's own server (port 8080, /ping, /invocations), its flags from SM_VLLM_* (buildkit/resources/image/sm_vllm.py);
  # `serve --dry-run` prints the command instead of running it.
  exec python /opt/lmi/python/sm_vllm.py "$@"
fi
exec "$@"
