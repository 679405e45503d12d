"""A generation score that runs offline: do a model's samples look like the data?

FID needs Inception weights (an ImageNet network, downloaded) and its ImageNet features say
little about digits or garments. This score keeps FID's recipe and swaps the network: a small
classifier is trained on the dataset's own training labels, and the samples and real images
are compared in its penultimate features:

- ``fd``: the Frechet distance between Gaussians fitted to the features of ``N`` model samples
  and of ``N`` real test images, ``|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))``;
- ``real_fd``: the same distance between ``N`` real train images and the same test images, the
  floor a model that samples the data distribution exactly would reach at this ``N``;
- ``precision`` and ``recall`` (Kynkaanniemi et al. 2019, k-nearest-neighbour manifolds in the
  same features): the fraction of samples inside the real images' manifold (fidelity), and of
  real images inside the samples' manifold (coverage); ``real_precision`` and ``real_recall``
  give the train-vs-test reference.

It is not FID: its figures are comparable only within one dataset, one classifier and one
``N`` (a Frechet distance estimated from ``N`` points is biased upwards, more for small ``N``).

The classifier is an MLP on the flattened pixels in [0, 1] (``HIDDEN`` widths, ReLU; its last
hidden layer is the feature), trained with Adam in one jitted ``lax.scan``. It is trained once
per dataset and cached as an ``.npz`` file named by a digest of the train split and the
classifier's settings (``jaxae evaluate --generation`` caches it in the run's folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxae.data import Dataset
from jaxae.errors import DataError, JaxaeError
from jaxae.probe import _classes

#: the classifier's hidden widths; the last is the feature the distances are measured in
HIDDEN = (256, 128)
#: the classifier's training: at most STEPS Adam steps and at most EPOCHS passes over the train
#: split (a small split is not drilled for 2000 steps), batch size, learning rate, and the seed of
#: its init and batches
STEPS, EPOCHS, BATCH_SIZE, LR, SEED = 2000, 30, 256, 1e-3, 0
#: neighbours that set a point's manifold radius (the paper's default)
K_NEIGHBOURS = 3
#: the default ``N``: as many samples as test images, at most this many
MAX_SAMPLES = 10_000
#: the cache file's format; a file of another format is retrained
CACHE_FORMAT = 1


@dataclass(frozen=True)
class FeatureClassifier:
    """The trained classifier: ``features(images)`` are what the distances compare."""

    params: dict[str, np.ndarray]
    classes: np.ndarray  # the train split's distinct labels; logit i is classes[i]
    test_accuracy: float

    def features(self, pixels: np.ndarray | jax.Array) -> np.ndarray:
        """Penultimate features ``[N, HIDDEN[-1]]`` of flat images ``[N, D]`` in [0, 1] (float64)."""
        return _batched(_features, self.params, pixels).astype(np.float64)


def _pixels(split: Dataset) -> np.ndarray:
    return split.images.reshape(len(split), -1).astype(np.float32) / 255.0


@jax.jit
def _features(params, x):
    for i in range(len(HIDDEN)):
        x = jax.nn.relu(x @ params[f"w{i}"] + params[f"b{i}"])
    return x


@jax.jit
def _logits(params, x):
    return _features(params, x) @ params["w_out"] + params["b_out"]


def _batched(fn, params, pixels, batch_size: int = 2000) -> np.ndarray:
    """``fn(params, x)`` over flat images ``[N, D]`` in [0, 1], ``batch_size`` at a time."""
    pixels = np.asarray(pixels, np.float32)
    return np.concatenate(
        [np.asarray(fn(params, jnp.asarray(pixels[i : i + batch_size]))) for i in range(0, len(pixels), batch_size)]
    )


def _init(key: jax.Array, inputs: int, classes: int) -> dict[str, jax.Array]:
    widths = (inputs, *HIDDEN)
    keys = jax.random.split(key, len(widths))
    init = jax.nn.initializers.he_normal()
    params = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        params[f"w{i}"], params[f"b{i}"] = init(keys[i], (a, b)), jnp.zeros((b,))
    params["w_out"] = jax.nn.initializers.glorot_normal()(keys[-1], (widths[-1], classes))
    params["b_out"] = jnp.zeros((classes,))
    return params


@jax.jit
def _train(params, images, labels, order):
    """Adam over the batches ``images[order[s]]``, one ``lax.scan`` step each."""
    tx = optax.adam(LR)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y).mean()

    def step(carry, idx):
        p, opt = carry
        x = images[idx].astype(jnp.float32) / 255.0
        grads = jax.grad(loss)(p, x, labels[idx])
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), order)
    return params


def _steps(train: Dataset) -> tuple[int, int]:
    """``(steps, batches per epoch)`` of the classifier's training on ``train``."""
    per_epoch = max(1, len(train) // BATCH_SIZE)
    return min(STEPS, EPOCHS * per_epoch), per_epoch


def _digest(train: Dataset) -> str:
    h = hashlib.sha256()
    settings = {"hidden": HIDDEN, "steps": _steps(train)[0], "batch_size": BATCH_SIZE, "lr": LR, "seed": SEED}
    h.update(json.dumps({"format": CACHE_FORMAT, "shape": list(train.images.shape), **settings}).encode())
    h.update(np.ascontiguousarray(train.images).data)
    h.update(np.ascontiguousarray(train.labels, np.int64).data)
    return h.hexdigest()


def _check_labels(train: Dataset, test: Dataset) -> None:
    for split in (train, test):
        if split.labels is None:
            raise DataError(
                f"--generation trains a classifier on the labels, and the {split.split} split of {split.name} has "
                "none; use a dataset with labels (an IDX folder with its *-labels-idx1-ubyte files, or a TFDS "
                "dataset with a 'label' feature)"
            )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"--generation: train images are {train.images.shape[1:]} but test images {test.images.shape[1:]}"
        )


def train_classifier(train: Dataset, test: Dataset) -> FeatureClassifier:
    """The feature classifier for this dataset, trained on ``train``'s labels and scored on ``test``'s.

    Raises:
        DataError: a split without labels, or labels a classifier cannot be trained on.
    """
    _check_labels(train, test)
    classes = _classes(train.images, train.labels, test.images, test.labels, what="--generation")
    y_train = jnp.asarray(np.searchsorted(classes, train.labels), jnp.int32)
    rng = np.random.default_rng(SEED)
    steps, per_epoch = _steps(train)
    batch = min(BATCH_SIZE, len(train))
    rows = []
    while len(rows) < steps:
        perm = rng.permutation(len(train))
        rows += [perm[i * batch : (i + 1) * batch] for i in range(per_epoch)]
    order = jnp.asarray(np.stack(rows[:steps]), jnp.int32)
    images = jnp.asarray(train.images.reshape(len(train), -1))
    params = _init(jax.random.key(SEED), images.shape[1], len(classes))
    params = _train(params, images, y_train, order)
    params = {k: np.asarray(v) for k, v in params.items()}
    predictions = np.argmax(_batched(_logits, params, _pixels(test)), -1)
    return FeatureClassifier(params, classes, float(np.mean(predictions == np.searchsorted(classes, test.labels))))


def load_or_train_classifier(
    train: Dataset, test: Dataset, cache_dir: str | Path | None
) -> tuple[FeatureClassifier, str]:
    """:func:`train_classifier`, cached in ``cache_dir`` (None: not cached).

    The file is ``generation-classifier-<digest>.npz``: another train split or other settings
    train a new one. A cache file that cannot be read is trained again and replaced (announced on
    stderr); a folder that cannot be written keeps the classifier in memory only, and says so.

    Returns:
        ``(classifier, how)``, ``how`` being ``"cached"``, ``"trained"`` or ``"trained, not cached: <why>"``.
    """
    if cache_dir is None:
        return train_classifier(train, test), "trained"
    _check_labels(train, test)
    digest = _digest(train)
    path = Path(cache_dir) / f"generation-classifier-{digest[:16]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                if meta.get("format") != CACHE_FORMAT or meta.get("digest") != digest:
                    raise ValueError(f"it was written for another dataset or format ({meta.get('format')})")
                params = {k[len("param_") :]: f[k] for k in f.files if k.startswith("param_")}
                return FeatureClassifier(params, f["classes"], float(meta["test_accuracy"])), "cached"
        except Exception as exc:  # a damaged or foreign file: train again and replace it
            print(f"jaxae: the classifier cached at {path} cannot be read ({exc}); training it again", file=sys.stderr)
    print(
        f"jaxae: --generation: training the feature classifier on {train.name} ({len(train)} images, once)",
        file=sys.stderr,
    )
    classifier = train_classifier(train, test)
    meta = {"format": CACHE_FORMAT, "digest": digest, "test_accuracy": classifier.test_accuracy, "hidden": HIDDEN}
    arrays = {f"param_{k}": v for k, v in classifier.params.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.asarray(json.dumps(meta)), classes=classifier.classes, **arrays)
        os.replace(tmp, path)  # whole or absent: a concurrent or interrupted write leaves no half file
    except OSError as exc:
        return classifier, f"trained, not cached: {exc.strerror or exc} ({path.parent})"
    return classifier, "trained"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to feature sets ``a [N, F]`` and ``b [M, F]``.

    ``Tr (C_a C_b)^(1/2)`` is computed as ``Tr (C_a^(1/2) C_b C_a^(1/2))^(1/2)``, the square root
    of a symmetric positive semi-definite matrix (its eigenvalues), in float64: no complex parts
    to discard as ``scipy.linalg.sqrtm`` of the non-symmetric product leaves.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise JaxaeError(f"a Frechet distance needs at least 2 points per set, got {len(a)} and {len(b)}")
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root_a @ cb @ root_a
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)))
    return float(max(0.0, mu @ mu + np.trace(ca) + np.trace(cb) - 2.0 * cross))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def _radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Each point's squared distance to its k-th nearest other point of ``x``."""
    out = np.empty(len(x))
    for i in range(0, len(x), chunk):
        d = _squared_distances(x[i : i + chunk], x)
        out[i : i + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return out


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
    """For each point, whether it lies in some centre's ball (``radii`` squared)."""
    return np.concatenate(
        [
            (_squared_distances(points[i : i + chunk], centres) <= radii[None, :]).any(1)
            for i in range(0, len(points), chunk)
        ]
    )


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = K_NEIGHBOURS, chunk: int = 1000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real`` features.

    A set's manifold is the union of balls around its points, each reaching its ``k``-th nearest
    neighbour in the set. Precision is the fraction of ``fake`` inside the manifold of ``real``;
    recall the fraction of ``real`` inside the manifold of ``fake``. Distances in float64.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise JaxaeError(
            f"precision and recall with k={k} need more than {k} points per set, got {len(real)} and {len(fake)}"
        )
    precision = _covered(fake, real, _radii(real, k, chunk), chunk).mean()
    recall = _covered(real, fake, _radii(fake, k, chunk), chunk).mean()
    return float(precision), float(recall)


def check_can_sample(trainer: Any, state: Any) -> None:
    """Raises a one-line :class:`~jaxae.errors.JaxaeError` unless the model draws samples."""
    from jaxae.train import can_sample

    if not can_sample(trainer, state):
        name = trainer.objective.name
        raise JaxaeError(
            f"--generation scores samples, and a {name} model draws none; it needs a vae, iwae or vqvae run"
        )


def generation_score(
    trainer: Any,
    state: Any,
    train: Dataset,
    test: Dataset,
    *,
    samples: int | None = None,
    classifier: FeatureClassifier | None = None,
    cache_dir: str | Path | None = None,
    prior: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The generation score of a trained generative model, as ``jaxae evaluate --generation`` reports it.

    Args:
        trainer: the model's trainer (:func:`jaxae.checkpoint.restore`, or ``fit``'s result); it must sample.
        state: its trained state.
        train: the dataset's train split, with labels: the classifier's training data, and the
            real images of ``real_fd``.
        test: its test split, with labels: the real images every distance is measured to.
        samples: ``N``, the model samples and real images per set (default: the test split's size, at
            most ``MAX_SAMPLES``); at most the size of either split.
        classifier: a classifier from :func:`train_classifier` (default: trained here, or read from
            ``cache_dir``).
        cache_dir: where the classifier is cached (None: not cached).
        prior: a VQ-VAE's code prior, ``"frequencies"`` (default) or ``"uniform"``.
        seed: the samples' PRNG seed, and of which real images are chosen when ``N`` is smaller.

    Returns:
        ``{"fd", "real_fd", "precision", "recall", "real_precision", "real_recall", "samples",
        "k", "features", "classifier_test_accuracy", "classifier"}``.

    Raises:
        JaxaeError: a model that cannot sample, ``samples`` out of range, or splits without labels.
    """
    from jaxae.train import sample_pixels

    check_can_sample(trainer, state)
    _check_labels(train, test)
    n = min(len(test), MAX_SAMPLES) if samples is None else samples
    if not K_NEIGHBOURS < n <= min(len(train), len(test)):
        raise JaxaeError(
            f"--generation-samples must be from {K_NEIGHBOURS + 1} to {min(len(train), len(test))} "
            f"(the smaller split of {train.name}), got {n}"
        )
    how = "given"
    if classifier is None:
        classifier, how = load_or_train_classifier(train, test, cache_dir)
    rng = np.random.default_rng(seed)

    def pick(split: Dataset) -> np.ndarray:  # n of the split's images, in [0, 1]
        rows = np.arange(n) if len(split) == n else np.sort(rng.choice(len(split), n, replace=False))
        return split.images[rows].reshape(n, -1).astype(np.float32) / 255.0

    real_test = classifier.features(pick(test))
    real_train = classifier.features(pick(train))
    fake = classifier.features(sample_pixels(trainer, state, n, jax.random.key(seed), prior=prior))
    precision, recall = precision_recall(real_test, fake)
    real_precision, real_recall = precision_recall(real_test, real_train)
    return {
        "fd": frechet_distance(fake, real_test),
        "real_fd": frechet_distance(real_train, real_test),
        "precision": precision,
        "recall": recall,
        "real_precision": real_precision,
        "real_recall": real_recall,
        "samples": n,
        "k": K_NEIGHBOURS,
        "features": HIDDEN[-1],
        "classifier_test_accuracy": classifier.test_accuracy,
        "classifier": how,
    }
