#!/usr/bin/env bash
# Entrypoint of vllm0.33-p4de: SageMaker runs the container as `docker run <image> serve`.
# Rendered from templates/entrypoint.sh.j2.
set -euo pipefail

# CUDA 13.0 forward compatibility: the NVIDIA Container Toolkit (>= 1.17.4) no longer mounts
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
    echo "host driver $host_driver is older than CUDA 13.0's $compat_driver: using cuda-compat" >&2
    export LD_LIBRARY_PATH="$compat_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi

if [[ "${1:-}" == "serve" ]]; then
  shift
  # vLLM's own server (port 8080, /ping, /invocations), its flags from SM_VLLM_* (buildkit/resources/image/sm_vllm.py);
  # `serve --dry-run` prints the command instead of running it.
  exec python /opt/lmi/python/sm_vllm.py "$@"
fi
exec "$@"
