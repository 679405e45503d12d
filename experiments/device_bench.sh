#!/usr/bin/env bash
# Accelerator figures in one call: `jaxae bench` (jaxae vs PyTorch, full fp32 and TF32), every
# model against its PyTorch twin, the document's run in float32 and bfloat16 (and a bfloat16 conv
# VAE), samples/s of the parallel strategies, and `jaxae sweep` of 1 to 256 seeds as one program.
#
# Command:   DATA=path/to/fashion-mnist-idx OUT=results-folder bash experiments/device_bench.sh
#            (DATA: a folder of Fashion-MNIST IDX files; without it the embedded MNIST sample is
#            used, and the script says so. PYTHON picks the interpreter, default python3.)
# Budget:    BUDGET seconds in all (default 480: 8 minutes); each step's timeout is the smaller of
#            its own cap and what is left, so the script ends in time even when a step hangs.
# Smoke:     SMOKE=1 runs every step on the CPU at tiny sizes (a few minutes on 2 cores), as the
#            test suite does (tests/test_device_bench.py).
# Exit:      0 when every step passed; 1 when any failed or ran out of time (each is named).
# Writes:    $OUT/bench.json, bench_tf32.json, bench_models.json, train_<name>.jsonl and
#            train.txt (one line per document run: dtype, epochs, seconds, final test loss),
#            parallel.txt, sweep.jsonl (one line per grid size), and each step's log.
set -u
PYTHON=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET:-480}
OUT=${OUT:-experiments/results/device}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then
    export JAX_PLATFORMS=cpu
else
    # No silent fall-back to the CPU: JAX fails at once when it cannot use the GPU.
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/jaxae-device-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
FAILED=()

if [ -n "${DATA:-}" ] && [ -d "$DATA" ]; then
    echo "dataset: $DATA"
else
    [ -n "${DATA:-}" ] && echo "DATA=$DATA is not a folder:" >&2
    echo "dataset: the embedded MNIST sample (mnist-sample; give DATA=<Fashion-MNIST IDX folder> for the real figures)"
    DATA=mnist-sample
fi

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log, within the budget.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 5 ]; then
        echo "[$name] skipped: the ${BUDGET} s budget is spent" >&2
        FAILED+=("$name (no time left)")
        return 1
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    local t0=$SECONDS
    timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "[$name] timed out after $cap s" >&2 || echo "[$name] failed (exit $rc):" >&2
        tail -5 "$OUT/$name.log" >&2
        FAILED+=("$name")
        return 1
    fi
    echo "[$name] ok in $((SECONDS - t0)) s"
}

if [ "$SMOKE" = 1 ]; then
    BATCHES=64 EPOCHS=1 ROUNDS=1 MODELS=vanilla-mlp,vae-conv IMAGES=256 TRAIN_EPOCHS=1 SWEEPS="1 2"
    PAR_EPOCHS=2 PAR_BATCHES=64
else
    BATCHES=256,1024,4096 EPOCHS=3 ROUNDS=3 MODELS=all IMAGES=0 TRAIN_EPOCHS=20 SWEEPS="1 8 64 256"
    PAR_EPOCHS=5 PAR_BATCHES=256,4096
fi

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step versions 60 "$PYTHON" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" \
    && cat "$OUT/versions.log"

# jaxae vs PyTorch on the document's model: both at full fp32, then both at TF32.
step bench 120 "$PYTHON" -m jaxae bench --dataset "$DATA" --batch-sizes "$BATCHES" --epochs "$EPOCHS" \
    --rounds "$ROUNDS" --no-torch-compile --matmul-precision highest --json "$OUT/bench.json"
step bench_tf32 90 "$PYTHON" -m jaxae bench --dataset "$DATA" --batch-sizes "${BATCHES%%,*}" --epochs "$EPOCHS" \
    --rounds "$ROUNDS" --no-torch-compile --matmul-precision default --json "$OUT/bench_tf32.json"
# Every model against its PyTorch twin.
step bench_models 120 "$PYTHON" -m jaxae bench --models "$MODELS" --dataset "$DATA" --batch-sizes 256 \
    --train-images "$IMAGES" --epochs "$EPOCHS" --rounds "$ROUNDS" --json "$OUT/bench_models.json"

# The document's run end to end in float32 and bfloat16, and a bfloat16 conv VAE.
: > "$OUT/train.txt"
for run in "vanilla-mlp float32" "vanilla-mlp bfloat16" "vae-conv bfloat16"; do
    set -- $run
    variant=${1%-*} arch=${1#*-} dtype=$2 name=$1-$2
    t0=$SECONDS
    if step "train_$name" 60 "$PYTHON" -m jaxae train --dataset "$DATA" --variant "$variant" --arch "$arch" \
        --dtype "$dtype" --epochs "$TRAIN_EPOCHS" --workdir "$TMP/$name" --no-progress --no-figures; then
        cp "$TMP/$name/metrics.jsonl" "$OUT/train_$name.jsonl"
        echo "$name: $TRAIN_EPOCHS epochs in $((SECONDS - t0)) s, $(tail -1 "$OUT/train_$name.log")" | tee -a "$OUT/train.txt"
    fi
done

step parallel 60 "$PYTHON" experiments/parallel_throughput.py --dataset "$DATA" --epochs "$PAR_EPOCHS" \
    --batch-sizes "$PAR_BATCHES" --out "$OUT/parallel.json" && tail -8 "$OUT/parallel.log" > "$OUT/parallel.txt"

# The sweep: M models (seeds 0..M-1) as one program on one device, no figures and one checkpoint
# per model at the end. Wall time includes start-up, the per-model init and compiling.
: > "$OUT/sweep.jsonl"
for M in $SWEEPS; do
    SWEEP_START=$SECONDS
    step "sweep_$M" 90 "$PYTHON" -m jaxae sweep --dataset "$DATA" --epochs "$TRAIN_EPOCHS" \
        --seeds "$(seq -s, 0 $((M - 1)))" --parallel none --no-progress --no-figures --save-every "$TRAIN_EPOCHS" \
        --workdir "$TMP/sweep$M" || continue
    WALL=$((SECONDS - SWEEP_START)) "$PYTHON" - "$M" "$TMP/sweep$M" >> "$OUT/sweep.jsonl" <<'PY'
import json, os, statistics, sys
from pathlib import Path
models, folder = int(sys.argv[1]), Path(sys.argv[2])
first = json.loads((folder / "summary.json").read_text())["runs"][0]["workdir"]
recs = [json.loads(l) for l in (folder / first / "metrics.jsonl").read_text().splitlines()]
later = recs[1:] or recs
print(json.dumps({"models": models, "wall_seconds": int(os.environ["WALL"]),
                  "median_epoch_seconds": statistics.median(r["seconds"] for r in later),
                  "training_samples_per_s": statistics.median(r["sweep_samples_per_s"] for r in later)}))
PY
    tail -1 "$OUT/sweep.jsonl"
done

echo "done in $((SECONDS - START)) s of the ${BUDGET} s budget; figures in $OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}" >&2
    exit 1
fi
