#!/usr/bin/env bash
# Entrypoint of djl0.36-g5: SageMaker runs the container as `docker run <image> serve`.
# Rendered from templates/entrypoint.sh.j2.
set -euo pipefail

# CUDA 12.8 forward compatibility: the NVIDIA Container Toolkit (>= 1.17.4) no longer mounts
# the compat libraries, so use them here, and only when the host driver is older than they are.
# Probed only where they exist: under `set -e -o pipefail` a failed probe would end the container (a host
# without a driver, e.g. `docker run <image> bash` on a CPU machine, must still start).
compat_dir=/usr/local/cuda/compat
compat_lib=
if [[ -d "$compat_dir" ]]; then
  compat_lib=$(find "$compat_dir" -maxdepth 1 -name 'libcuda.so.*.*' | sort -V | tail -n 1)
fi
host_driver=
if [[ -r /proc/driver/nvidia/version ]]; then
  host_driver=$(sed -n 's/.*Kernel Module *\([0-9][0-9.]*\).*/\1/p' /proc/driver/nvidia/version)
  host_driver=${host_driver%%$'\n'*}
fi
if [[ -n "$compat_lib" && -n "$host_driver" ]]; then
  compat_driver=${compat_lib##*/libcuda.so.}
  if [[ "$(printf '%s\n%s\n' "$host_driver" "$compat_driver" | sort -V | head -n 1)" == "$host_driver" \
        && "$host_driver" != "$compat_driver" ]]; then
    echo "host driver $host_driver is older than CUDA 12.8's $compat_driver: using cuda-compat" >&2
    export LD_LIBRARY_PATH="$compat_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi

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
