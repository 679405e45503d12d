#!/usr/bin/env bash
# GPU figures: `jaxae bench` (jaxae vs PyTorch on the same GPU), the document's 20-epoch
# Fashion-MNIST run end to end, and samples/s of the parallel strategies.
#
# Command:   DATA=path/to/fashion-mnist OUT=results-folder bash experiments/device_bench.sh
# Runtime:   about 5 minutes on one H100 (most of it PyTorch's DataLoader and torch.compile).
# Expected:  jaxae several times faster than eager PyTorch at batch 256; 20 epochs of
#            Fashion-MNIST (1.2M samples) in about a second of training.
# Writes:    $OUT/bench_gpu.json, $OUT/bench_gpu.txt, $OUT/train_gpu.jsonl, $OUT/parallel_gpu.txt
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
