#!/usr/bin/env bash
# gpu_check.sh: the GPU path once, end to end, with one summary at the end. On a CUDA machine:
#
#     bash gpu_check.sh                       # cifar10: bench, 2000 iters (bf16 + compile), FID-5k
#     ITERS=500 SAMPLES=2000 bash gpu_check.sh
#
# 1. bench.py for the cifar10 preset (DiT-B/2, batch 256): eager and compiled ms/iter, MFU and the
#    peak memory of each;
# 2. a short cifar10 training from scratch with bf16 autocast and torch.compile (the preset's
#    flags, fewer iterations), in $OUT/run;
# 3. SAMPLES class-balanced samples from its EMA weights under torchrun (NPROC processes, one a
#    GPU) into ADM's npz, and ADM's five numbers against the train images (sample_ddp.py), for each
#    solver (SOLVERS) at STEPS network calls: images/s and FID, sFID, IS, precision, recall each.
#
# It needs data/cifar10 prepared (`python prepare_data.py --dataset=cifar10`, which downloads the
# tarball, or --data_dir=a local copy) and, for FID, an Inception: FID_MODEL=a TorchScript file, or
# torch-fidelity / fid-helper installed (see fid.py). Everything it writes goes under $OUT.
# A dry run of the script on a CPU, tiny and in a minute or two (the FID of a stub extractor):
#     DATASET=shapes ITERS=20 SAMPLES=64 BENCH_ITERS=2 FID_MODEL=stub.pt FID_REF=256 \
#         EXTRA="--device=cpu --n_layer=1 --n_head=2 --n_embd=32 --batch_size=8" bash gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")"
DATASET=${DATASET:-cifar10}
ITERS=${ITERS:-2000}
SAMPLES=${SAMPLES:-5000}
BENCH_ITERS=${BENCH_ITERS:-10}
EXTRA=${EXTRA:-}                      # flags added to bench.py and purrception.py (a dry run's)
FID_MODEL=${FID_MODEL:-}
FID_REF=${FID_REF:-0}                 # train images for the FID reference; 0: all of them
NPROC=${NPROC:-1}                     # sampling processes (GPUs) under torchrun
SOLVERS=${SOLVERS:-"euler dpm++2m"}   # the sampler's ODE solvers, each scored
STEPS=${STEPS:-50}                    # network calls per sample
OUT=${OUT:-gpu-check-$DATASET}
mkdir -p "$OUT"
python -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$OUT/device.log"

# 1. bench: eager and compiled, each with its own peak memory
python bench.py --dataset="$DATASET" --bench_iters="$BENCH_ITERS" $EXTRA | tee "$OUT/bench.log"

# 2. a short training: bf16 autocast on CUDA, torch.compile; a log line every 100 iters
python purrception.py --dataset="$DATASET" --compile=true --max_iters="$ITERS" \
    --eval_interval="$ITERS" --log_interval=$(( ITERS < 100 ? 1 : 100 )) --out_dir="$OUT/run" \
    --overwrite=true $EXTRA | tee "$OUT/train.log"

# 3. for each solver: samples into $OUT/run/samples_SOLVER.npz, then the five numbers (process 0)
: > "$OUT/fid.log"
for SOLVER in $SOLVERS; do
    python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" sample_ddp.py \
        --out_dir="$OUT/run" --fid --num_samples="$SAMPLES" --fid_ref="$FID_REF" \
        --solver="$SOLVER" --steps="$STEPS" --save_npz="samples_${SOLVER}.npz" \
        ${FID_MODEL:+--fid_model="$FID_MODEL"} | tee -a "$OUT/fid.log"
done

# the summary: the lines that carry the figures
{
    echo "== gpu_check summary ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    cat "$OUT/device.log"
    grep -E "^bench on|^train (eager|compiled)|^compile speed-up|^sampler" "$OUT/bench.log"
    grep -E "^model|^training on" "$OUT/train.log"
    grep -E "^iter " "$OUT/train.log" | tail -n 1
    grep -E "^eval iter" "$OUT/train.log" | tail -n 1
    grep -E " samples in |^(FID|sFID|IS|precision|recall|the samples)" "$OUT/fid.log"
} | tee "$OUT/summary.txt"
