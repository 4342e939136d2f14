#!/usr/bin/env bash
# The long chaos run: a sweep of STRATA_CHAOS_JOBS jobs of
# STRATA_CHAOS_STEPS steps each trains while workers are killed (SIGKILL)
# and frozen (SIGSTOP), the coordinator is killed and started again, the
# checkpoints' S3 store fails requests and the state disk fills up; every
# job must end with its fault-free losses bit for bit, no complete
# checkpoint lost, the store readable, no worker left running. It prints
# what it injected and what it found (lines starting `chaos:`).
#
# The same test runs shorter in the suite (cli/tests/chaos.rs). Needs
# root for the full-disk fault (a tmpfs for the state folder); without
# it that fault is skipped, saying so.
#
#   scripts/chaos.sh                     # 8 jobs × 160 steps, a random seed
#   STRATA_CHAOS_SEED=7 scripts/chaos.sh # replay a seed's order of faults
set -euo pipefail
cd "$(dirname "$0")/.."
export STRATA_CHAOS_JOBS="${STRATA_CHAOS_JOBS:-8}"
export STRATA_CHAOS_STEPS="${STRATA_CHAOS_STEPS:-160}"
export STRATA_CHAOS_SEED="${STRATA_CHAOS_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
export CARGO_INCREMENTAL=0
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
echo "chaos: seed $STRATA_CHAOS_SEED, $STRATA_CHAOS_JOBS jobs of $STRATA_CHAOS_STEPS steps" >&2
exec cargo test --workspace --features strata-cli/cuda,strata-cli/wgpu --test chaos -- --nocapture
