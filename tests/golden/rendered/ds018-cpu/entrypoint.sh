#!/usr/bin/env bash
# Entrypoint of ds018-cpu: SageMaker runs the container as `docker run <image> serve`.
# Rendered from templates/entrypoint.sh.j2.
set -euo pipefail

if [[ "${1:-}" == "serve" ]]; then
  shift
  # DJL runs MPI mode (one rank per partition) only where GPUs are: without one it fails every model load
  # ("GPU devices are not enough to run N partitions", PyModel.java). So MPI mode is the default only when
  # a GPU is visible and nobody chose otherwise (serving.properties' option.mpi_mode still wins); without a
  # GPU DJL runs the handler as one process, one rank.
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  if [[ -z "${OPTION_MPI_MODE:-}" && "${gpus:-0}" -gt 0 ]]; then
    export OPTION_MPI_MODE=true
  fi
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
