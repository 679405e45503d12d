"""Colour Fashion-MNIST: a 32x32 RGB dataset made offline from Fashion-MNIST, for the colour rows
of docs/results.md.

Command:   .venv/bin/python experiments/make_colour_fashion.py [--fashion-dir data/fashion-mnist]
           [--out data/colour-fashion-mnist]
Runtime:   about 10 seconds.
Expected:  an IDX folder of 60,000 train / 10,000 test uint8 images 32x32x3 (train-images-idx4-ubyte.gz, ...)
           with Fashion-MNIST's labels; ``jaxae train --dataset data/colour-fashion-mnist`` reads it.

Each garment is padded from 28x28 to 32x32 (2 black pixels a side, so the conv model's sides
divide by 4) and drawn in a colour of its own on a background of its own: with ``a`` the
grey level in [0, 1], a pixel is ``a * ink + (1 - a) * paper``, ``ink`` and ``paper`` drawn
uniformly from the RGB cube per image (seeded, so the folder is the same every time). An
autoencoder must keep two colours per image besides the shape, and a Sigmoid decoder can
reach every value. It stands in for a natural colour dataset (CIFAR-10, SVHN), which cannot
be downloaded where the published figures were made; with one prepared, the same commands
run on ``--dataset cifar10``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jaxae.data import load_dataset, write_idx_folder

SEED = 0
SIDE = 32


def colourise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, 28, 28, 1]`` -> uint8 ``[N, 32, 32, 3]``: padded, one ink and one paper colour per image."""
    pad = (SIDE - images.shape[1]) // 2
    grey = np.pad(images.astype(np.float32) / 255, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ink, paper = rng.uniform(0, 1, (2, len(images), 1, 1, 3)).astype(np.float32)
    return np.round(255 * (grey * ink + (1 - grey) * paper)).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-dir", default="data/fashion-mnist", help="Fashion-MNIST as IDX files")
    parser.add_argument("--out", default="data/colour-fashion-mnist", help="the folder to write")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rng = np.random.default_rng(SEED)
    splits = {}
    for split in ("train", "test"):
        data = load_dataset(args.fashion_dir, split)
        splits[split] = (colourise(data.images, rng), data.labels)
    out = write_idx_folder(Path(args.out), **splits)
    print(
        f"wrote {out}: {len(splits['train'][0])} train / {len(splits['test'][0])} test images "
        f"{'x'.join(map(str, splits['train'][0].shape[1:]))} in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
