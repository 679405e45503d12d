"""Every variant of the document, with the number for each application it names.

Command:   .venv/bin/python experiments/variants.py [--fashion-dir data/fashion-mnist] [--only-sample]
Runtime:   about 25 minutes on a 2-core CPU (7 models x 2 datasets, 20 epochs each, plus probes).
Expected:  compression: vanilla test_mse ~0.044 (sample) / ~0.0135 (Fashion-MNIST) at code size 32;
           noise removal: the denoiser raises PSNR by a few dB over its noisy input (std 0.5);
           feature extraction: linear-probe accuracy on the 32-d codes vs on the 784 pixels;
           generation: VAE negative ELBO and the importance-weighted NLL (K=100) in nats.
Writes:    experiments/results/variants.json and experiments/results/<variant>-<arch>-<dataset>/.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax

from jaxae.data import load_dataset
from jaxae.loop import fit
from jaxae.objectives import importance_weighted_nll
from jaxae.probe import linear_probe
from jaxae.train import TrainConfig

HERE = Path(__file__).resolve().parent
RUNS = [
    ("vanilla", "mlp"),
    ("denoising", "mlp"),
    ("sparse", "mlp"),
    ("vae", "mlp"),
    ("vanilla", "conv"),
    ("denoising", "conv"),
    ("vae", "conv"),
]
IW_SAMPLES = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fashion-dir",
        default="data/fashion-mnist",
        help="a folder of the Fashion-MNIST IDX files, relative to the repo root (see docs/datasets.md)",
    )
    parser.add_argument("--only-sample", action="store_true")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    datasets = [("mnist-sample", "mnist-sample")]
    if not args.only_sample and os.path.isdir(args.fashion_dir):
        datasets.append(("fashion-mnist", args.fashion_dir))
    out_file = HERE / "results" / "variants.json"
    rows = []
    for label, dataset in datasets:
        train = load_dataset(dataset, "train")
        test = load_dataset(dataset, "test")
        for variant, arch in RUNS:
            config = TrainConfig(variant=variant, arch=arch, dataset=dataset, epochs=args.epochs)
            workdir = HERE / "results" / f"{variant}-{arch}-{label}"
            t0 = time.perf_counter()
            result = fit(config, workdir, progress=False)
            seconds = time.perf_counter() - t0
            last = result.history[-1]
            row = {
                "dataset": label,
                "variant": variant,
                "arch": arch,
                "command": f"jaxae train --variant {variant} --arch {arch} --dataset {dataset} --epochs {args.epochs}",
                "train_seconds": seconds,
                "samples_per_s": last["samples_per_s"],
                **{k: v for k, v in last.items() if k.startswith("test_")},
            }
            row.update(linear_probe(result.trainer, result.state, train, test))
            if variant == "vae":
                images = jax.device_put(test.images.reshape(len(test), -1))
                fn = importance_weighted_nll(result.trainer.normalization, config.likelihood, IW_SAMPLES)
                nll = result.trainer.jit_mean_over(result.state, images, fn=fn, batch_size=100)
                row["test_nll_iw"] = float(nll["nll_iw"])
                row["iw_samples"] = IW_SAMPLES
            print(json.dumps(row), flush=True)
            rows.append(row)
            out_file.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
