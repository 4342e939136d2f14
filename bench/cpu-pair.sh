#!/usr/bin/env bash
# strata against PyTorch on this machine's CPU, side by side in one run:
# for each recipe, strata on NdArray and on flex, then PyTorch (f32, the
# same shape, tokens and learning rates) with glibc's default allocator and
# with glibc told to keep large blocks (no unmap and page-fault per step),
# all with the same number of threads. Prints one JSON line per run.
#
#   bench/cpu-pair.sh [STEPS] [RECIPE...]    (defaults: 5, tiny-4l and gpt2-small)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-5}"; shift || true
recipes=("$@"); [ ${#recipes[@]} -gt 0 ] || recipes=(bench/tiny-4l.toml bench/gpt2-small.toml)
bin="${STRATA_BIN:-target/release/strata}"
threads="${THREADS:-$(nproc)}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
show() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({k: d[k] for k in ['implementation','backend','device','params','seq_len','tokens_per_step','tokens_per_s','step_s','forward_s','backward_s','optimizer_s','peak_memory_bytes']} | {'recipe': sys.argv[2], 'allocator': sys.argv[3], 'last_loss': d['losses'][-1]}))" "$@"; }
for r in "${recipes[@]}"; do
  for b in ndarray flex; do
    RAYON_NUM_THREADS=$threads "$bin" bench train "$r" --backend $b --steps "$steps" --warmup 1 --json >"$tmp/$b.json"
    show "$tmp/$b.json" "$r" mimalloc
  done
  python3 bench/torch_reference.py --like "$tmp/flex.json" --threads "$threads" >"$tmp/torch.json"
  show "$tmp/torch.json" "$r" glibc
  MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \
    python3 bench/torch_reference.py --like "$tmp/flex.json" --threads "$threads" >"$tmp/torch.json"
  show "$tmp/torch.json" "$r" glibc-keep-large-blocks
done
