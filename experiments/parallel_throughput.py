"""Training throughput of the data-parallel strategies on the devices this machine has.

Command:   .venv/bin/python experiments/parallel_throughput.py [--dataset data/fashion-mnist]
           [--strategies none,shard,pmap] [--batch-sizes 256,4096] [--epochs 6] [--out NAME.json]
Runtime:   under a minute on one GPU; a few minutes on a 2-core CPU.
Expected:  every strategy reaches the same train loss (the runs are the same computation);
           samples/s is the median over epochs 2..N of `fit()`'s per-epoch figure (train epoch
           only, evaluation excluded, compile time excluded).
Writes:    experiments/results/<--out> (default parallel_throughput-<platform>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import jax

from jaxae.loop import fit
from jaxae.parallel import get_strategy
from jaxae.train import TrainConfig

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="data/fashion-mnist")
    parser.add_argument("--strategies", default="none,shard,pmap")
    parser.add_argument("--batch-sizes", default="256,4096")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    dataset = args.dataset if os.path.isdir(args.dataset) else "mnist-sample"
    devices = jax.devices()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is a warm-up, left out of samples/s")
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for name in args.strategies.split(","):
            strategy = get_strategy(name)
            config = TrainConfig(dataset=dataset, epochs=args.epochs, batch_size=batch_size)
            result = fit(config, progress=False, strategy=strategy)
            rates = [r["samples_per_s"] for r in result.history[1:]]
            row = {
                "strategy": name,
                "devices": strategy.device_count,
                "batch_size": batch_size,
                "samples_per_s": statistics.median(rates),
                "compile_seconds": result.compile_seconds,
                "final_train_loss": result.history[-1]["train_loss"],
                "final_test_loss": result.history[-1]["test_loss"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "dataset": dataset,
        "epochs": args.epochs,
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": len(devices),
        "jax": jax.__version__,
        "rows": rows,
    }
    out = HERE / "results" / (args.out or f"parallel_throughput-{devices[0].platform}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
