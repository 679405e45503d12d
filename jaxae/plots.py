"""Figures: reconstruction grids, loss curves, samples (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_examples(labels: np.ndarray, count: int = 10) -> np.ndarray:
    """Indices of ``count`` test images, one per class first (0, 1, 2, ...) where possible."""
    chosen: list[int] = []
    for c in np.unique(labels):
        chosen.append(int(np.flatnonzero(labels == c)[0]))
        if len(chosen) == count:
            break
    rest = [i for i in range(len(labels)) if i not in set(chosen)]
    return np.array((chosen + rest)[:count])


def reconstruction_grid(path: str | Path, originals: np.ndarray, reconstructions: np.ndarray, title: str = "") -> None:
    """Originals (top row) over their reconstructions (bottom row); pixel values in [0, 1]."""
    plt = _pyplot()
    n = len(originals)
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.6), squeeze=False)
    for i in range(n):
        for row, images in enumerate((originals, reconstructions)):
            ax = axes[row][i]
            ax.imshow(np.clip(images[i].squeeze(), 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("input", fontsize=9)
    axes[1][0].set_ylabel("output", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(path: str | Path, images: np.ndarray, columns: int = 8, title: str = "") -> None:
    """A grid of images with pixel values in [0, 1] (e.g. samples from a VAE's prior)."""
    plt = _pyplot()
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns, rows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            ax.imshow(np.clip(images[i].squeeze(), 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_curves(path: str | Path, history: Sequence[dict[str, Any]], title: str = "") -> None:
    """Train and test loss per epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [r["train_loss"] for r in history], marker="o", ms=3, label="train")
    ax.plot(epochs, [r["test_loss"] for r in history], marker="o", ms=3, label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_run_figures(out: Path, trainer: Any, state: Any, test: Any, history: Sequence[dict[str, Any]]) -> None:
    """``reconstructions.png`` and ``loss.png`` (plus whatever the objective adds) for a run."""
    import jax
    import jax.numpy as jnp

    idx = pick_examples(test.labels, 10)
    images = jnp.asarray(test.images[idx].reshape(len(idx), -1))
    norm = trainer.normalization
    recon = jax.jit(lambda p, x: trainer.model(p)(norm(x)))(state.params, images)
    shape = test.images.shape[1:]
    reconstruction_grid(
        out / "reconstructions.png",
        np.asarray(images, np.float32).reshape(-1, *shape) / 255.0,
        np.asarray(norm.to_pixels(recon)).reshape(-1, *shape),
        title=f"{trainer.objective.name}: test inputs (top) and reconstructions (bottom)",
    )
    if history:
        loss_curves(out / "loss.png", history, title=f"{trainer.objective.name} on {test.name}")
