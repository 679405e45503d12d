"""One `jaxae sweep` of a seed grid against the same `jaxae train` runs one after another.

Command:   .venv/bin/python experiments/sweep_bench.py [--dataset data/fashion-mnist] [--seeds 0,1,...,7]
           [--epochs 20] [--parallel none] [--out experiments/results/sweep_bench.json]
Runtime:   about 5-8 minutes on a 2-core CPU for 8 seeds x 20 epochs of Fashion-MNIST (most of it
           the 8 sequential runs); about a minute with --dataset mnist-sample.
Expected:  on a 2-core CPU about the same wall time (measured 0.97x: the sweep pays the process
           start, data load and compile once instead of eight times, but its training is no
           faster, both already keep the cores busy). The test-loss gap between each swept model
           and its `jaxae train` twin: ~1e-8 for the first ~100 steps (the embedded sample's
           first epochs), then float32 rounding of the batched matmuls grows through training to
           the size of the seed-to-seed spread (~2e-4 to 5e-4 on Fashion-MNIST from epoch 1).
Writes:    --out (JSON): wall seconds and aggregate samples/s of both, their ratios, per-epoch
           largest |test loss difference| between each swept model and its train run.

Each run is a real `python -m jaxae` process, timed from start to exit (process start, data
loading, compiling, training, evaluation, checkpoints, figures), so the figures are what a user
waits for. Training samples/s (the train epochs only) come from the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(argv: list[str]) -> float:
    """Seconds a ``python -m jaxae ...`` process takes, start to exit."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxae", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"sweep_bench: {' '.join(argv[:1])} failed:\n{proc.stderr[-2000:]}")
    return seconds


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="data/fashion-mnist", help="a folder of IDX files, or mnist-sample")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--parallel", default="none", help="the sweep's --parallel (default: none)")
    parser.add_argument("--out", default=str(HERE / "results" / "sweep_bench.json"))
    parser.add_argument("--note", default="", help="recorded in the JSON, e.g. that the machine was shared")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = ["--dataset", args.dataset, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    common += ["--no-progress"]

    from jaxae.data import load_dataset

    n_train = len(load_dataset(args.dataset, "train"))
    work = Path(tempfile.mkdtemp(prefix="sweep_bench_"))
    try:
        sequential = []
        for seed in seeds:
            argv = [
                "train",
                *common,
                "--seed",
                str(seed),
                "--workdir",
                str(work / f"train{seed}"),
                "--parallel",
                "none",
            ]
            sequential.append(run(argv))
            print(f"jaxae train --seed {seed}: {sequential[-1]:.1f} s", flush=True)
        sweep_dir = work / "sweep"
        sweep_argv = ["sweep", *common, "--seeds", args.seeds, "--workdir", str(sweep_dir), "--parallel", args.parallel]
        sweep_seconds = run(sweep_argv)
        print(f"jaxae sweep --seeds {args.seeds}: {sweep_seconds:.1f} s", flush=True)

        summary = json.loads((sweep_dir / "summary.json").read_text())
        gaps = [0.0] * args.epochs
        train_seconds_sequential = 0.0
        finals = []
        train_seconds_sweep = 0.0
        for run_entry in summary["runs"]:
            swept = records(sweep_dir / run_entry["workdir"])
            alone = records(work / f"train{run_entry['seed']}")
            for e, (a, b) in enumerate(zip(swept, alone, strict=True)):
                gaps[e] = max(gaps[e], abs(a["test_loss"] - b["test_loss"]))
            train_seconds_sequential += sum(n_train / r["samples_per_s"] for r in alone)
            finals.append(alone[-1]["test_loss"])
        # Every model of the sweep shares each epoch's time: count it once.
        first = records(sweep_dir / summary["runs"][0]["workdir"])
        train_seconds_sweep = sum(n_train / r["samples_per_s"] for r in first)
        samples = len(seeds) * n_train * args.epochs
        sequential_seconds = sum(sequential)
        report = {
            "command": " ".join(["python", "experiments/sweep_bench.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "note": args.note,
            "dataset": args.dataset,
            "models": len(seeds),
            "epochs": args.epochs,
            "placement": summary["placement"],
            "wall_seconds": {"sequential_train": sequential_seconds, "sweep": sweep_seconds},
            "wall_seconds_each_train": sequential,
            "aggregate_samples_per_s": {
                "sequential_train": samples / sequential_seconds,
                "sweep": samples / sweep_seconds,
            },
            "training_only_samples_per_s": {
                "sequential_train": samples / train_seconds_sequential,
                "sweep": samples / train_seconds_sweep,
            },
            "ratios_sweep_over_sequential": {
                "wall_time": sweep_seconds / sequential_seconds,
                "aggregate_samples_per_s": sequential_seconds / sweep_seconds,
                "training_only_samples_per_s": train_seconds_sequential / train_seconds_sweep,
            },
            "max_abs_test_loss_gap_by_epoch": gaps,
            "max_abs_test_loss_gap_first_3_epochs": max(gaps[:3]),
            "max_abs_test_loss_gap": max(gaps),
            # The spread between seeds, for scale: the gap is rounding, this is the seed's effect.
            "final_test_loss_std_over_seeds_train": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_test_loss_mean_train": statistics.fmean(finals),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("wall_seconds", "ratios_sweep_over_sequential")}, indent=2))
    print(
        f"largest |test loss gap|: first 3 epochs {report['max_abs_test_loss_gap_first_3_epochs']:.2e}, "
        f"all {args.epochs} epochs {report['max_abs_test_loss_gap']:.2e}; written {out}"
    )


if __name__ == "__main__":
    main()
