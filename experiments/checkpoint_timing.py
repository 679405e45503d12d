"""How long one checkpoint of the document's model takes to save and to restore.

Command:   .venv/bin/python experiments/checkpoint_timing.py
Runtime:   about 15 seconds on a 2-core CPU.
Expected:  the document's model with its Adam state is 2.7 MB of arrays (2.2 MB on disk). On
           this project's 2-core CPU (shared, busy) an asynchronous save blocked training for
           20-30 ms and was complete on disk after 0.1-0.2 s; a restore, checked against the
           saved digest, took about 50 ms (70 ms including rebuilding the model from the config).
Writes:    experiments/results/checkpoint_timing.json
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxae import checkpoint
from jaxae.data import load_dataset
from jaxae.train import TrainConfig, build

HERE = Path(__file__).resolve().parent
REPEATS = 7


def main() -> None:
    config = TrainConfig()
    trainer, state = build(config, 784)
    train = load_dataset(config.dataset, "train")
    images = jax.device_put(train.images.reshape(len(train), -1))
    state, _ = trainer.jit_train_epoch(state, images, batch_size=config.batch_size)
    jax.block_until_ready(state)
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))

    blocking, complete, restore, restore_full = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(REPEATS):
            workdir = Path(tmp) / f"run{i}"
            with checkpoint.Checkpoints(workdir) as ckpts:
                t0 = time.perf_counter()
                ckpts.save(state, config, metrics={"test_loss": 0.1})
                t1 = time.perf_counter()
                ckpts.wait()
                t2 = time.perf_counter()
            blocking.append(t1 - t0)
            complete.append(t2 - t0)
            _, fresh = build(config, 784)
            t0 = time.perf_counter()
            restored = checkpoint.restore_state(workdir, fresh)
            jax.block_until_ready(restored)
            restore.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoint.restore(workdir)  # also rebuilds the model from the saved config
            restore_full.append(time.perf_counter() - t0)
        on_disk = sum(p.stat().st_size for p in checkpoint.step_dir(workdir, int(state.step)).rglob("*") if p.is_file())

    # The first round includes one-time costs (imports, thread pools); report the rest.
    def ms(xs):
        return round(1000 * statistics.median(xs[1:]), 1)

    result = {
        "model": "vanilla 784-128-64-32, Adam state",
        "state_bytes": nbytes,
        "checkpoint_bytes_on_disk": on_disk,
        "save_blocking_ms": ms(blocking),
        "save_complete_ms": ms(complete),
        "restore_state_ms": ms(restore),
        "restore_with_model_ms": ms(restore_full),
        "first_save_complete_ms": round(1000 * complete[0], 1),
        "first_restore_ms": round(1000 * restore[0], 1),
        "repeats": REPEATS,
        "device": str(jax.devices()[0]),
    }
    print(json.dumps(result, indent=2))
    (HERE / "results" / "checkpoint_timing.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
