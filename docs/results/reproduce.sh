#!/usr/bin/env bash
# The reproduction runs behind docs/results/<dataset>/ (issue 6), exactly as they were run
# on the 2-core development machine (no GPU): one Ray job per expert, the router, the
# monolith (the experts' total training compute in one model) and the feature network,
# then `ddm analyze` with n = 1000 per strategy and 2 seeds.
#
#   bash docs/results/reproduce.sh fashion-mnist 200    # experts' steps; monolith 8x that
#   MONOLITH=0 bash docs/results/reproduce.sh mnist-5k 150   # as run: no monolith
#
# ROOT (default ./repro) holds the stores and the Ray head's state; DDM the ddm command;
# MONOLITH=0 skips the monolith (its training and its column).
set -euo pipefail
dataset=${1:?dataset: fashion-mnist | mnist-5k}
expert_steps=${2:?optimizer steps per expert}
DDM=${DDM:-.venv/bin/ddm}
ROOT=${ROOT:-./repro}
MONOLITH=${MONOLITH:-1}
store="$ROOT/$dataset"
out="docs/results/$dataset"
mkdir -p "$ROOT"
export DDM_CLUSTER_DIR="$ROOT/cluster"

[ -e "$store/dataset.json" ] || $DDM prepare --store "$store" --dataset "$dataset" --clusters 8
$DDM cluster up
trap '$DDM cluster down' EXIT

# K=8 experts of the CPU default preset (unet-tiny), batch 64, 1 CPU each; the monolith
# gets 8x an expert's steps: the same total training compute.
monolith=()
if [ "$MONOLITH" = 1 ]; then
    monolith=(--include-monolith)
    $DDM submit --store "$store" --clusters none --monolith --steps $((8 * expert_steps))
fi
$DDM submit --store "$store" --clusters none --router --featnet --steps $((6 * expert_steps))
$DDM submit --store "$store" --clusters all --steps "$expert_steps" --wait
if [ "$MONOLITH" = 1 ]; then
    $DDM submit --store "$store" --clusters none --monolith --steps $((8 * expert_steps)) --wait
fi
$DDM submit --store "$store" --clusters none --router --featnet --steps $((6 * expert_steps)) --wait
$DDM cluster down
trap - EXIT

# 10 Euler steps (not 50): a unet-tiny evaluation costs ~5 ms per image on these 2 cores,
# and the full ensemble evaluates all 8 experts at every step.
$DDM analyze --store "$store" --out "$out" "${monolith[@]}" --strategies full,top-1,top-2 \
    --n 1000 --seeds 0,1 --steps 10 --stability-n 64 --alignment-n 64 --disagreement-n 32
