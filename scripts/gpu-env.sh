#!/usr/bin/env bash
# Sourced by scripts/gpu-check.sh (`. scripts/gpu-env.sh DIR`): makes the CUDA
# driver, NVRTC, NCCL and the CUDA headers findable by a strata binary built
# with `--features cuda`, from a toolkit under /usr/local/cuda or from
# PyTorch's pip packages. DIR receives links to the libraries' plain names.
py="${PYTHON:-python3}"
# Libraries: the driver's libcuda comes with the driver; NVRTC and NCCL from
# a CUDA toolkit or from PyTorch's pip packages (nvidia-*), whose files are
# versioned only (libnccl.so.2): link the plain names cudarc loads.
libs="${1:-/tmp/strata-gpu-env}/libs"
mkdir -p "$libs"
site="$("$py" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)"
dirs=""
for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 "$site"/nvidia/*/lib "$site"/nvidia/cu*/lib; do
  [ -d "$d" ] && dirs="$dirs:$d"
done
for name in nccl nvrtc; do
  if ! ldconfig -p 2>/dev/null | grep -q "lib$name.so "; then
    f="$(for d in ${dirs//:/ }; do ls "$d"/lib$name.so* 2>/dev/null; done | grep -v alt | sort | tail -1)"
    [ -n "$f" ] && ln -sf "$f" "$libs/lib$name.so" && echo "gpu-env: lib$name.so -> $f" >&2
  fi
done
export LD_LIBRARY_PATH="$libs$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NVRTC compiles burn's kernels against the CUDA headers.
if [ -z "${CUDA_PATH:-}" ]; then
  for d in /usr/local/cuda "$site"/nvidia/cu13 "$site"/nvidia/cuda_runtime; do
    if [ -f "$d/include/cuda.h" ] || [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_PATH="$d"; break; fi
  done
fi
echo "gpu-env: CUDA_PATH=${CUDA_PATH:-unset}" >&2

