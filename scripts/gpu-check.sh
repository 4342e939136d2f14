#!/usr/bin/env bash
# The GPU checks of strata, for a machine with NVIDIA GPUs, PyTorch (with
# its pip NVIDIA packages) and no Rust toolchain or network. Build the
# binary elsewhere and bring it:
#
#   cargo build --release --bin strata --features cuda
#   STRATA_BIN=path/to/strata scripts/gpu-check.sh [OUT_DIR]
#
# It finds the CUDA driver, NVRTC, NCCL and the CUDA headers (a toolkit
# under /usr/local/cuda, or PyTorch's pip packages), then runs:
#   1. 20 training steps of a small model on the GPU in bf16 (mixed
#      precision, the GPU's default) and in f32, and on the CPU in f32, and
#      compares the losses: f32 within 1e-3 relative, bf16 within 5e-3
#      (flex's bf16 against its f32 on this model: 8.7e-5);
#   2. `strata bench nccl`: NCCL's all-reduce, reduce-scatter, all-gather
#      and broadcast on burn's CUDA tensors over every GPU present (one
#      thread each), in f32 and bf16, against host sums;
#   3. `strata demo --device cuda`: a coordinator leasing GPU 0 to a worker
#      that trains on it, end to end through gRPC and the dataplane;
#   4. the benchmark pair on a 350M model at sequence 2048: strata's CUDA
#      backend, then PyTorch (bf16 autocast, fused AdamW, SDPA) on the same
#      GPU, same shape, tokens and learning rates;
# and prints one JSON summary (also written to OUT_DIR/summary.json, with
# every step's report beside it). Each step has its own time limit, so the
# whole script ends within 8 minutes (9.5 when the fused backend fails and
# the unfused one is tried) and reports what it reached.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/strata-gpu-check}}"
mkdir -p "$out"
bin="${STRATA_BIN:-target/release/strata}"
py="${PYTHON:-python3}"
log() { echo "gpu-check: $*" >&2; }

[ -x "$bin" ] || { log "no strata binary at $bin (set STRATA_BIN)"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi -L >&2

# shellcheck source=scripts/gpu-env.sh
. scripts/gpu-env.sh "$out"
# Per-step progress (and where a step stalls) in each step's log.
export RUST_LOG="${RUST_LOG:-strata=info,strata_worker=debug}"
# burn compiles a few hundred kernels with NVRTC and autotunes every matrix
# shape in the first step (over 140 s on an H200 at the balanced level):
# every step below shares one kernel cache, so later runs read back what
# earlier ones compiled, and the autotuner tries fewer candidates unless
# told otherwise. Both are in the summary.
export STRATA_KERNEL_CACHE="${STRATA_KERNEL_CACHE:-/tmp/strata-kernels}"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"

# A step: its JSON report, or its error.
run_step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.json" 2>"$out/$name.log"
  local rc=$?
  log "$name: exit $rc after $((SECONDS - t0)) s"
  if [ $rc -eq 124 ]; then echo "timed out after $limit s" >>"$out/$name.log"; fi
  [ $rc -eq 0 ] || tail -5 "$out/$name.log" >&2
  return $rc
}

small=bench/tiny-4l.toml
big=examples/power-350m.toml
shape=(--seq 2048 --tokens-per-step 16384 --microbatches 4 --steps 4 --warmup 2)
# burn's fused CUDA backend; if it fails, the unfused one tells whether
# fusion is the cause.
cuda=cuda
run_step small-cuda 90 "$bin" bench train "$small" --backend cuda --precision bf16 --steps 18 --warmup 2 --json ||
  { cuda=cuda-unfused; run_step small-cuda 90 "$bin" bench train "$small" --backend cuda-unfused --precision bf16 --steps 18 --warmup 2 --json; }
run_step small-cuda-f32 60 "$bin" bench train "$small" --backend "$cuda" --precision f32 --steps 18 --warmup 2 --json
run_step nccl 40 "$bin" bench nccl --json
run_step demo-cuda 50 "$bin" demo --device cuda --dp 1 --steps 10 --dir "$out/demo"
echo $? >"$out/demo-cuda.rc"
run_step small-cpu 30 "$bin" bench train "$small" --backend flex --steps 18 --warmup 2 --json
run_step big-cuda 150 "$bin" bench train "$big" --backend "$cuda" --precision bf16 "${shape[@]}" --json
# PyTorch mirrors strata's run, or its description when that run failed.
like="$out/big-cuda.json"
if ! [ -s "$like" ]; then
  like="$out/big-shape.json"
  "$bin" bench train "$big" "${shape[@]}" --describe >"$like"
fi
run_step big-torch 60 "$py" bench/torch_reference.py --like "$like"

"$py" - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name + ".json")
    try:
        return json.load(open(p))
    except Exception:
        log = os.path.join(out, name + ".log")
        tail = open(log).read().strip().splitlines()[-3:] if os.path.exists(log) else []
        return {"error": " | ".join(tail) or "did not run"}
s = {k: load(k) for k in ["small-cuda", "small-cuda-f32", "small-cpu", "big-cuda", "big-torch", "nccl"]}
summary = {"kernel_cache": os.environ.get("STRATA_KERNEL_CACHE"),
           "autotune_level": os.environ.get("CUBECL_AUTOTUNE_LEVEL")}
b = s["small-cpu"]
for key, name, tol in [("small_losses_bf16", "small-cuda", 5e-3), ("small_losses_f32", "small-cuda-f32", 1e-3)]:
    a = s[name]
    if "losses" in a and "losses" in b:
        rel = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"]))
        summary[key] = {"cuda": a["losses"], "cpu_f32": b["losses"], "max_rel_diff": rel,
                        "tolerance": tol, "pass": rel <= tol}
    else:
        summary[key] = {"cuda": a.get("error"), "cpu_f32": b.get("error"), "pass": False}
for k in ["small-cuda", "small-cuda-f32", "small-cpu", "big-cuda", "big-torch"]:
    r = s[k]
    summary[k] = r if "error" in r else {f: r.get(f) for f in [
        "backend", "device", "compute_dtype", "params", "seq_len", "tokens_per_step", "microbatches",
        "tokens_per_s", "step_s", "forward_s", "backward_s", "optimizer_s", "achieved_tflops", "mfu",
        "peak_memory_bytes", "host_elems_per_step"]}
summary["nccl"] = s["nccl"]
demo_log = os.path.join(out, "demo-cuda.json")
demo_rc = open(os.path.join(out, "demo-cuda.rc")).read().strip() if os.path.exists(os.path.join(out, "demo-cuda.rc")) else "did not run"
demo_tail = open(demo_log).read().strip().splitlines()[-4:] if os.path.exists(demo_log) else []
err_log = os.path.join(out, "demo-cuda.log")
err_tail = open(err_log).read().strip().splitlines()[-3:] if os.path.exists(err_log) else []
summary["demo_cuda"] = {"exit": demo_rc, "pass": demo_rc == "0", "stdout_tail": demo_tail, "stderr_tail": err_tail}
if "tokens_per_s" in s["big-cuda"]:
    for k in ["big-torch"]:
        if "tokens_per_s" in s[k]:
            summary[f"ratio_strata_over_{k.replace('-', '_')}"] = s["big-cuda"]["tokens_per_s"] / s[k]["tokens_per_s"]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
