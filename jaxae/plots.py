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


def _picture(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` for imshow from ``[H, W, C]``; ``squeeze`` would also drop a
    side of length 1 and hand imshow a row or a scalar."""
    image = np.asarray(image)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def pick_examples(labels: np.ndarray, count: int = 10) -> np.ndarray:
    """Indices of ``count`` test images, one per class first (0, 1, 2, ...) where possible."""
    chosen: list[int] = []
    for c in np.unique(labels):
        chosen.append(int(np.flatnonzero(labels == c)[0]))
        if len(chosen) == count:
            break
    rest = [i for i in range(len(labels)) if i not in set(chosen)]
    return np.array((chosen + rest)[:count])


def reconstruction_grid(path: str | Path, rows: Sequence[tuple[str, np.ndarray]], title: str = "") -> None:
    """One row per ``(label, images)``, e.g. inputs over their reconstructions; pixels in [0, 1]."""
    plt = _pyplot()
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.15 * len(rows) + 0.3), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(np.clip(_picture(images[i]), 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=9)
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
            ax.imshow(np.clip(_picture(images[i]), 0, 1), cmap="gray", vmin=0, vmax=1)
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
    """``reconstructions.png`` and ``loss.png`` for a run, and ``samples.png`` for a generative model.

    The denoiser's figure has three rows: clean input, corrupted input (the evaluation's
    fixed-seed corruption), output.
    """
    import jax
    import jax.numpy as jnp

    from jaxae.objectives import VARIANTS
    from jaxae.train import sample_pixels

    idx = pick_examples(test.labels, 10) if test.labels is not None else np.arange(min(10, len(test.images)))
    images = jnp.asarray(test.images[idx].reshape(len(idx), -1))
    norm = trainer.normalization
    objective = trainer.objective
    model = trainer.model(state.params)
    x = norm(images)
    shape = test.images.shape[1:]

    def pixels(v):
        return np.asarray(norm.to_pixels(v)).reshape(-1, *shape)

    rows = [("input", pixels(x))]
    if objective.corrupt is not None:
        x = objective.corrupt(x, trainer.eval_keys(state, jnp.asarray(idx, jnp.int32)))
        rows.append(("noisy", pixels(x)))
    output = model(x)
    if objective.name in VARIANTS and VARIANTS[objective.name].variational and getattr(model, "decode", None):
        output = np.asarray(output).reshape(-1, *shape)  # the VAE decodes to [0, 1] pixel means
        rows.append(("output", output))
    else:
        rows.append(("output", pixels(output)))
    what = " over ".join(label for label, _ in rows)
    reconstruction_grid(out / "reconstructions.png", rows, title=f"{objective.name}: test images, {what}")
    if hasattr(model, "sample"):
        variational = objective.name in VARIANTS and VARIANTS[objective.name].variational
        # A VAE samples from its prior; a VQ-VAE draws codes, by the training frequencies or uniformly.
        priors = (
            {"samples.png": ()}
            if variational
            else {"samples.png": ("frequencies",), "samples_uniform.png": ("uniform",)}
        )
        for name, prior in priors.items():
            samples = sample_pixels(trainer, state, 64, jax.random.key(0), prior=prior[0] if prior else None)
            what = (
                "the prior"
                if variational
                else f"codes drawn {'uniformly' if prior == ('uniform',) else 'by their training frequencies'}"
            )
            image_grid(
                out / name,
                samples.reshape(-1, *shape),
                columns=8,
                title=f"{objective.name}: samples from {what}",
            )
    if history:
        loss_curves(out / "loss.png", history, title=f"{objective.name} on {test.name}")
