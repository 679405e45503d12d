"""Training throughput with ``--save-every-steps`` against the whole-epoch scan, in one run.

Command:   .venv/bin/python experiments/save_every_steps_speed.py [--dataset data/fashion-mnist]
Runtime:   about 2 minutes on a 2-core CPU.
Expected:  the same test loss in every row (an epoch in parts is the same computation); the
           throughput falls with smaller parts, mostly through the checkpoint each part saves
           (the row without a workdir runs the same parts and saves nothing).
Writes:    experiments/results/save_every_steps_speed.json

samples/s is the median over epochs 2..4 of ``fit()``'s per-epoch figure (training only,
checkpoint saves inside the epoch included). The whole-epoch row runs first and last, so the
spread between the two says how noisy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from jaxae.loop import fit
from jaxae.train import TrainConfig

HERE = Path(__file__).resolve().parent

ROWS = [
    ("whole epoch", None, True),
    ("parts of 100 steps, a checkpoint each", 100, True),
    ("parts of 20 steps, a checkpoint each", 20, True),
    ("parts of 20 steps, no workdir (no saves)", 20, False),
    ("whole epoch, again", None, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="data/fashion-mnist")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "save_every_steps_speed.json")
    args = parser.parse_args()
    dataset = args.dataset if os.path.isdir(args.dataset) else "mnist-sample"
    config = TrainConfig(dataset=dataset, epochs=4, batch_size=256)
    rows = []
    for label, every, save in ROWS:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp) / "run" if save else None
            result = fit(config, workdir, progress=False, figures=False, events=False, save_every_steps=every)
        rate = statistics.median(r["samples_per_s"] for r in result.history[1:])
        rows.append(
            {
                "row": label,
                "save_every_steps": every,
                "samples_per_s": round(rate),
                **{"test_loss": result.history[-1]["test_loss"]},
            }
        )
        print(f"{label:42s} {rate:9.0f} samples/s  test loss {result.history[-1]['test_loss']:.6f}", flush=True)
    out = {"dataset": Path(dataset).name, "batch_size": 256, "machine": f"{os.cpu_count()} CPUs", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
