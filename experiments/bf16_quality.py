"""bfloat16 against float32: the document's model and the conv VAE on Fashion-MNIST, 3 seeds.

Command:   .venv/bin/python experiments/bf16_quality.py FASHION_MNIST_IDX_FOLDER [--epochs 5] [--only mlp|conv]
Runtime:   on the project's 2-core CPU, about 1 minute for the MLP rows and 12 for the conv VAE's
           (XLA's CPU backend has no bfloat16 matrix units: there bfloat16 only costs conversions).
Expected:  bfloat16's test loss within 3 % of float32's for both models (the issue's bar).
Writes:    experiments/results/bf16_quality.json; the sweeps under runs/bf16_quality.

Each row is one sweep of seeds 0, 1, 2 (``jaxae sweep --seeds 0,1,2``, as ``errorbars.py``
does), with ``--dtype float32`` or ``--dtype bfloat16`` and everything else the defaults
(batch 256, Adam 1e-3, ``[0, 1]`` inputs). Reported: each seed's final test loss (the document's
MSE; the VAE's negative ELBO in nats), their mean and sample std, and bfloat16's mean over
float32's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from jaxae.config import TrainConfig
from jaxae.sweep import fit_sweep, sweep_configs

HERE = Path(__file__).parent
MODELS = {"mlp": dict(variant="vanilla", arch="mlp"), "conv": dict(variant="vae", arch="conv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--only", choices=tuple(MODELS), default=None)
    parser.add_argument("--runs-dir", default="runs/bf16_quality")
    args = parser.parse_args()
    out = HERE / "results" / "bf16_quality.json"
    report = json.loads(out.read_text()) if out.exists() else {}
    for name, model in MODELS.items():
        if args.only and name != args.only:
            continue
        rows = {}
        for dtype in ("float32", "bfloat16"):
            base = TrainConfig(dataset=args.dataset, epochs=args.epochs, dtype=dtype, **model)
            folder = Path(args.runs_dir) / f"{name}-{dtype}"
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            result = fit_sweep(sweep_configs(base, seed=[0, 1, 2]), folder, progress=False, figures=False)
            losses = [h[-1]["test_loss"] for h in result.histories]
            rows[dtype] = {
                "test_loss": losses,
                "mean": statistics.mean(losses),
                "std": statistics.stdev(losses),
                "seconds": time.perf_counter() - t0,
            }
            print(f"{name} {dtype}: {rows[dtype]['mean']:.5f} ± {rows[dtype]['std']:.5f} {losses}", flush=True)
        rows["bfloat16_over_float32"] = rows["bfloat16"]["mean"] / rows["float32"]["mean"]
        report[name] = {"model": model, "epochs": args.epochs, "dataset": args.dataset, **rows}
        print(f"{name}: bfloat16 / float32 = {rows['bfloat16_over_float32']:.4f}", flush=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
