"""Figures of the colour rows of docs/results.md: each model's reconstructions (and the VAEs'
samples), from the seed-0 models ``errorbars.py --only colour`` trained.

Command:   .venv/bin/python experiments/colour_figures.py [--colour-dir data/colour-fashion-mnist]
           [--runs-dir runs/errorbars]   (after ``experiments/errorbars.py --only colour``)
Runtime:   about 20 seconds.
Expected:  test garments in their own colours over their reconstructions: the MLPs keep the two
           colours and blur the shape, the conv models keep both; VAE samples are garment-like
           shapes in mixed colours.
Writes:    experiments/results/<variant>-<arch>-colour-fashion-mnist/{reconstructions,loss,samples}.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxae import checkpoint, plots
from jaxae.data import load_dataset

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--colour-dir", default="data/colour-fashion-mnist")
    parser.add_argument("--runs-dir", default="runs/errorbars")
    args = parser.parse_args()
    test = load_dataset(args.colour_dir, "test")
    for arch in ("mlp", "conv"):
        for variant in ("vanilla", "vae"):
            workdir = Path(args.runs_dir) / f"variants-colour-{variant}-{arch}" / "seed0"
            trainer, state, _ = checkpoint.restore(workdir)
            history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
            out = HERE / "results" / f"{variant}-{arch}-colour-fashion-mnist"
            out.mkdir(parents=True, exist_ok=True)
            plots.write_run_figures(out, trainer, state, test, history)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
