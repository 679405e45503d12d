#!/usr/bin/env bash
# GPU figures: `jaxae bench` (jaxae vs PyTorch on the same GPU), the document's 20-epoch
# Fashion-MNIST run end to end, samples/s of the parallel strategies, and `jaxae sweep` of
# 1, 8, 64 and 256 seeds of the document's model as one program on one GPU.
#
# Command:   DATA=path/to/fashion-mnist OUT=results-folder bash experiments/device_bench.sh
# Runtime:   about 5 minutes on one H100 (most of it PyTorch's DataLoader and torch.compile).
# Expected:  jaxae several times faster than eager PyTorch at batch 256; 20 epochs of
#            Fashion-MNIST (1.2M samples) in about a second of training.
# Writes:    $OUT/bench_gpu.json, $OUT/bench_gpu.txt, $OUT/train_gpu.jsonl, $OUT/parallel_gpu.txt,
#            $OUT/sweep_gpu.jsonl (one line per grid size: models, wall seconds, epoch seconds,
#            aggregate training samples/s from the runs' metrics.jsonl)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-.devdata/fashion-mnist}
OUT=${OUT:-experiments/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
timeout 300 python3 -m jaxae bench --dataset "$DATA" --batch-sizes 256,1024,4096 --epochs 3 --rounds 3 \
    --json "$OUT/bench_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/bench_gpu.txt"
time timeout 90 python3 -m jaxae train --dataset "$DATA" --epochs 20 \
    --workdir /tmp/gpu_run --no-progress 2>&1 | tail -2
cp /tmp/gpu_run/metrics.jsonl "$OUT/train_gpu.jsonl" 2>/dev/null
timeout 90 python3 experiments/parallel_throughput.py --dataset "$DATA" --epochs 5 --out parallel_throughput-gpu.json 2>&1 | tail -8 | tee "$OUT/parallel_gpu.txt"
cp experiments/results/parallel_throughput-gpu.json "$OUT/" 2>/dev/null

# The sweep: 1, 8, 64, 256 models (seeds 0..M-1), 20 epochs, one GPU, no figures (256 PNGs
# would time matplotlib) and one checkpoint per model at the end (256 Orbax saves every epoch
# would time the disk). Wall time includes start-up, the per-model init and compiling.
: > "$OUT/sweep_gpu.jsonl"
for M in 1 8 64 256; do
    rm -rf "/tmp/gpu_sweep$M"
    SECONDS=0
    timeout 600 python3 -m jaxae sweep --dataset "$DATA" --epochs 20 --seeds "$(seq -s, 0 $((M - 1)))" \
        --parallel none --no-progress --no-figures --save-every 20 --workdir "/tmp/gpu_sweep$M" > /dev/null 2> "/tmp/gpu_sweep$M.err" \
        || { echo "sweep of $M models failed:"; tail -3 "/tmp/gpu_sweep$M.err"; continue; }
    WALL=$SECONDS python3 - "$M" "/tmp/gpu_sweep$M" >> "$OUT/sweep_gpu.jsonl" <<'PY'
import json, os, statistics, sys
from pathlib import Path
models, folder = int(sys.argv[1]), Path(sys.argv[2])
first = json.loads((folder / "summary.json").read_text())["runs"][0]["workdir"]
recs = [json.loads(l) for l in (folder / first / "metrics.jsonl").read_text().splitlines()]
epoch_s = statistics.median(r["seconds"] for r in recs[1:])
print(json.dumps({"models": models, "wall_seconds": int(os.environ["WALL"]), "median_epoch_seconds": epoch_s,
                  "training_samples_per_s": statistics.median(r["sweep_samples_per_s"] for r in recs[1:])}))
PY
    tail -1 "$OUT/sweep_gpu.jsonl"
done
