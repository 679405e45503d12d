"""Training: the state, the pure jitted steps, an epoch as one ``lax.scan``, and ``fit()``.

The whole split lives on the device as ``uint8[N, D]``. Each epoch draws a permutation on the
device, gathers its batches there, normalises them inside the step and runs every step in
one ``lax.scan``: the host never touches a batch, and after the first epoch nothing is
traced or compiled again.

Every example is seen once per epoch, as with PyTorch's ``DataLoader(drop_last=False)``: the
last batch is padded to the full batch size and the padded rows are masked out of the loss,
so its mean is over the real rows only, exactly like PyTorch's smaller final batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxae.data import Normalization, get_normalization, load_dataset
from jaxae.errors import JaxaeError
from jaxae.models import image_shape_of
from jaxae.objectives import Objective, get_variant

# Independent random streams derived from a run's key (fold_in constants).
_PARAMS_STREAM, _DATA_STREAM, _STEP_STREAM = 0, 1, 2
_TRAIN_NOISE, _EVAL_NOISE = 0, 1


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; written to ``config.json`` and into checkpoints.

    The defaults are the document's: 20 epochs, batch 256, Adam 1e-3, MSE, [0, 1] inputs.
    """

    variant: str = "vanilla"
    dataset: str = "mnist-sample"
    tfds_data_dir: str | None = None
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    normalize: str = "unit"
    init: str = "torch"
    hidden_dims: tuple[int, ...] = (128, 64)
    latent_dim: int = 32
    eval_batch_size: int = 1000
    arch: str = "mlp"
    # denoising
    noise_std: float = 0.5
    mask_prob: float = 0.0
    # sparse
    sparsity: str = "l1"
    sparsity_weight: float = 0.01
    sparsity_target: float = 0.05
    # vae
    beta: float = 1.0
    likelihood: str = "bernoulli"

    def validate(self) -> None:
        """Raises :class:`JaxaeError` for settings no run can use."""
        if self.epochs <= 0:
            raise JaxaeError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise JaxaeError(f"--batch-size must be positive, got {self.batch_size}")
        if self.eval_batch_size <= 0:
            raise JaxaeError(f"eval batch size must be positive, got {self.eval_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise JaxaeError(f"--lr must be a positive number, got {self.lr}")
        if self.latent_dim <= 0 or any(h <= 0 for h in self.hidden_dims):
            raise JaxaeError("layer sizes must be positive")
        variant = get_variant(self.variant)
        get_normalization(self.normalize)
        if self.arch not in ("mlp", "conv"):
            raise JaxaeError(f"unknown --arch {self.arch!r}; choose mlp or conv")
        if self.arch not in variant.archs:
            raise JaxaeError(
                f"--arch {self.arch} is not available for the {self.variant} variant ({', '.join(variant.archs)})"
            )
        if not (0 <= self.noise_std < float("inf")):
            raise JaxaeError(f"--noise-std must be >= 0, got {self.noise_std}")
        if not (0 <= self.mask_prob < 1):
            raise JaxaeError(f"--mask-prob must be in [0, 1), got {self.mask_prob}")
        if self.sparsity not in ("l1", "kl"):
            raise JaxaeError(f"unknown --sparsity {self.sparsity!r}; choose l1 or kl")
        if not (self.sparsity_weight >= 0):
            raise JaxaeError(f"--sparsity-weight must be >= 0, got {self.sparsity_weight}")
        if not (0 < self.sparsity_target < 1):
            raise JaxaeError(f"--sparsity-target must be in (0, 1), got {self.sparsity_target}")
        if not (self.beta >= 0):
            raise JaxaeError(f"--beta must be >= 0, got {self.beta}")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise JaxaeError(f"unknown --likelihood {self.likelihood!r}; choose bernoulli or gaussian")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise JaxaeError(f"unknown config keys: {', '.join(unknown)}")
        d = dict(d)
        if "hidden_dims" in d:
            d["hidden_dims"] = tuple(d["hidden_dims"])
        return cls(**d)


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, as one pytree (what a checkpoint saves).

    ``rng`` and ``data_rng`` are raw key data (``jax.random.key_data``) so the state
    serialises as plain arrays. Per-step randomness is ``fold_in(rng, step)`` and the data
    order of an epoch is ``fold_in(data_rng, epoch)``: a resumed run replays the same keys.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    epoch: jax.Array
    rng: jax.Array
    data_rng: jax.Array


def _wrap(key_data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(key_data)


def example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
    """One key per example, from its dataset index: identical however a batch is split."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids)


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
    """The static half of training: model structure, optimizer, objective, normalisation.

    Its methods are pure functions of their array arguments; ``jit_*`` are their compiled
    forms. Build one with :func:`create_train_state`.
    """

    graphdef: Any
    tx: optax.GradientTransformation
    objective: Objective
    normalization: Normalization

    def model(self, params: Any) -> nnx.Module:
        """The NNX module holding ``params`` (``state.params``)."""
        return nnx.merge(self.graphdef, params)

    # -- one step -------------------------------------------------------------------------

    def train_step(
        self,
        state: TrainState,
        batch: jax.Array,
        mask: jax.Array | None = None,
        example_ids: jax.Array | None = None,
        *,
        axis_name: str | None = None,
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a uint8 batch ``[B, ...]``.

        Args:
            state: the current state.
            batch: uint8 images ``[B, H, W, C]`` or ``[B, D]``; normalised here.
            mask: float ``[B]``, 1 for real rows, 0 for padding (default: all real).
            example_ids: int ``[B]`` dataset indices; they seed per-example randomness
                (default: ``arange(B)``).
            axis_name: the mapped axis when run under ``pmap``/``shard_map``: the loss and
                gradients are then sums over every device's rows divided by the global count.

        Returns:
            The new state and ``{"loss": mean loss, "count": rows, <metric>: mean, ...}``.
        """
        b = batch.shape[0]
        if mask is None:
            mask = jnp.ones((b,), jnp.float32)
        if example_ids is None:
            example_ids = jnp.arange(b, dtype=jnp.int32)
        x = self.normalization(batch.reshape(b, -1))
        step_key = jax.random.fold_in(jax.random.fold_in(_wrap(state.rng), _TRAIN_NOISE), state.step)
        keys = example_keys(step_key, example_ids)
        count = _global_sum(jnp.sum(mask), axis_name)

        def loss_fn(params):
            per_example, metrics = self.objective.loss(self.model(params), x, keys)
            loss = jnp.sum(per_example * mask) / count
            return loss, {k: jnp.sum(v * mask) / count for k, v in metrics.items()}

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            loss, metrics, grads = jax.lax.psum((loss, metrics, grads), axis_name)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, {"loss": loss, "count": count, **metrics}

    # -- one epoch ------------------------------------------------------------------------

    def epoch_batches(self, state: TrainState, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
        """This epoch's example indices ``[steps, B]`` and mask ``[steps, B]``."""
        steps = -(-n // batch_size)
        key = jax.random.fold_in(_wrap(state.data_rng), state.epoch)
        perm = jax.random.permutation(key, n).astype(jnp.int32)
        pad = steps * batch_size - n
        ids = jnp.concatenate([perm, perm[:pad]]).reshape(steps, batch_size)
        mask = (jnp.arange(steps * batch_size) < n).astype(jnp.float32).reshape(steps, batch_size)
        return ids, mask

    def train_epoch(
        self, state: TrainState, images: jax.Array, batch_size: int
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One pass over ``images`` (uint8 ``[N, D]`` on the device) as a ``lax.scan``.

        Returns the new state and per-step metrics (arrays of length ``ceil(N / B)``).
        """
        ids, mask = self.epoch_batches(state, images.shape[0], batch_size)

        def body(state, xs):
            ids_b, mask_b = xs
            return self.train_step(state, images[ids_b], mask_b, ids_b)

        state, metrics = jax.lax.scan(body, state, (ids, mask))
        return state.replace(epoch=state.epoch + 1), metrics

    def train_epoch_shard(
        self, state: TrainState, images: jax.Array, ids: jax.Array, mask: jax.Array, *, axis_name: str
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One epoch on one device of a data-parallel run (under ``pmap`` or ``shard_map``).

        Args:
            state: this device's copy of the (replicated) state.
            images: uint8 ``[N, D]``, the whole split, on this device.
            ids, mask: this device's columns ``[steps, B / devices]`` of :meth:`epoch_batches`.
            axis_name: the device axis the loss and gradients are summed over.

        Returns:
            The new state and per-step metrics, identical on every device.
        """

        def body(state, xs):
            ids_b, mask_b = xs
            return self.train_step(state, images[ids_b], mask_b, ids_b, axis_name=axis_name)

        state, metrics = jax.lax.scan(body, state, (ids, mask))
        return state.replace(epoch=state.epoch + 1), metrics

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(self, state: TrainState, images: jax.Array, batch_size: int = 1000) -> dict[str, jax.Array]:
        """Mean of each of the objective's test metrics over ``images`` (uint8 ``[N, D]``).

        Randomness (noise, VAE samples) uses a fixed key per example, so every evaluation
        of the same parameters gives the same numbers.
        """
        return self.mean_over(state, images, self.objective.evaluate, batch_size)

    def eval_keys(self, state: TrainState, example_ids: jax.Array) -> jax.Array:
        """The fixed per-example keys of evaluation (the same for every evaluation)."""
        return example_keys(jax.random.fold_in(_wrap(state.rng), _EVAL_NOISE), example_ids)

    def mean_over(
        self, state: TrainState, images: jax.Array, fn: Callable, batch_size: int = 1000
    ) -> dict[str, jax.Array]:
        """Means over ``images`` of ``fn(model, x, keys) -> {name: [B]}``, chunk by chunk in a scan."""
        n = images.shape[0]
        batch_size = min(batch_size, n)
        steps = -(-n // batch_size)
        ids = jnp.arange(steps * batch_size, dtype=jnp.int32)
        mask = (ids < n).astype(jnp.float32).reshape(steps, batch_size)
        ids = jnp.where(ids < n, ids, 0).reshape(steps, batch_size)
        model = self.model(state.params)

        def body(_, xs):
            ids_b, mask_b = xs
            x = self.normalization(images[ids_b].reshape(batch_size, -1))
            per_example = fn(model, x, self.eval_keys(state, ids_b))
            return None, {k: jnp.sum(v * mask_b) for k, v in per_example.items()}

        _, sums = jax.lax.scan(body, None, (ids, mask))
        return {k: jnp.sum(v) / n for k, v in sums.items()}

    # -- compiled forms -------------------------------------------------------------------

    @functools.cached_property
    def jit_train_step(self) -> Callable:
        return jax.jit(self.train_step, donate_argnums=0)

    @functools.cached_property
    def jit_train_epoch(self) -> Callable:
        return jax.jit(self.train_epoch, static_argnames="batch_size", donate_argnums=0)

    @functools.cached_property
    def jit_evaluate(self) -> Callable:
        return jax.jit(self.evaluate, static_argnames="batch_size")

    def encode_batch(self, params: Any, batch: jax.Array) -> jax.Array:
        """Codes of a uint8 batch, normalised as in training."""
        return self.model(params).encode(self.normalization(batch.reshape(batch.shape[0], -1)))

    @functools.cached_property
    def jit_encode(self) -> Callable:
        # One compiled function per trainer: encode() is called for both splits (the probe),
        # and a jit made inside it would compile again on every call.
        return jax.jit(self.encode_batch)

    @functools.cached_property
    def jit_mean_over(self) -> Callable:
        return jax.jit(self.mean_over, static_argnames=("fn", "batch_size"))


def _global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    objective: Objective | str = "vanilla",
    normalization: Normalization | str = "unit",
    seed: int = 0,
) -> tuple[Trainer, TrainState]:
    """Splits ``model`` into a :class:`Trainer` (static) and a :class:`TrainState` (arrays).

    Args:
        model: an NNX autoencoder (e.g. :class:`jaxae.Autoencoder`).
        tx: an optax optimizer, e.g. ``optax.adam(1e-3)``.
        objective: an :class:`Objective` or a variant name (built with default settings).
        normalization: a :class:`Normalization` or a preset name (``"unit"``, ``"seed"``).
        seed: seeds the data order and the per-step randomness.
    """
    if isinstance(normalization, str):
        normalization = get_normalization(normalization)
    if isinstance(objective, str):
        objective = get_variant(objective).build_objective(TrainConfig(variant=objective), normalization)
    graphdef, variables = nnx.split(model)
    params = nnx.to_pure_dict(variables)
    root = jax.random.key(seed)
    state = TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        epoch=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.fold_in(root, _STEP_STREAM)),
        data_rng=jax.random.key_data(jax.random.fold_in(root, _DATA_STREAM)),
    )
    return Trainer(graphdef, tx, objective, normalization), state


def build(config: TrainConfig, input_shape: int | tuple[int, ...]) -> tuple[Trainer, TrainState]:
    """The model, optimizer and objective a config describes, freshly initialised.

    Args:
        config: the run's settings.
        input_shape: the image shape ``(H, W, C)``, or the flat input size (784).
    """
    variant = get_variant(config.variant)
    normalization = get_normalization(config.normalize)
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(config.seed), _PARAMS_STREAM))
    model = variant.build_model(config, image_shape_of(input_shape), rngs)
    objective = variant.build_objective(config, normalization)
    return create_train_state(model, optax.adam(config.lr), objective, normalization, config.seed)


def encode(trainer: Trainer, state: TrainState, images: np.ndarray | jax.Array, batch_size: int = 1000) -> np.ndarray:
    """Codes ``[N, latent]`` of uint8 images ``[N, ...]`` (normalised as in training)."""
    images = jnp.asarray(images)
    n = images.shape[0]
    return np.concatenate(
        [np.asarray(trainer.jit_encode(state.params, images[i : i + batch_size])) for i in range(0, n, batch_size)]
    )


def summarize_epoch(step_metrics: dict[str, Any]) -> dict[str, float]:
    """Per-step metrics of one epoch -> their means over all examples."""
    count = np.asarray(step_metrics["count"], np.float64)
    total = count.sum()
    return {
        k: float(np.sum(np.asarray(v, np.float64) * count) / total) for k, v in step_metrics.items() if k != "count"
    }


def init_params_from(workdir: str | Path, trainer: Trainer, state: TrainState) -> TrainState:
    """``state`` with the parameters of the latest checkpoint in ``workdir`` and a fresh optimizer.

    The step, epoch and random streams stay ``state``'s: a fine-tuning run is a new run that
    starts from other weights.

    Raises:
        JaxaeError: no checkpoint there, or its parameters do not fit this run's model.
    """
    from jaxae import checkpoint

    _, saved, saved_config = checkpoint.restore(workdir)
    want = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    have = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(saved.params)}
    if want != have:
        differ = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        key = differ[0]
        raise JaxaeError(
            f"--init-from {workdir} holds a {saved_config.variant} model whose parameters do not fit this run's "
            f"{key}: {have.get(key, 'absent')} there, {want.get(key, 'absent')} here; "
            "use the same --variant, --hidden-dims and --latent-dim"
        )
    params = saved.params
    return state.replace(params=params, opt_state=trainer.tx.init(params))


@dataclasses.dataclass
class FitResult:
    trainer: Trainer
    state: TrainState
    history: list[dict[str, Any]]
    compile_seconds: float
    start_epoch: int = 0  # epochs already done when this call began (non-zero on resume)


def fit(
    config: TrainConfig,
    workdir: str | Path | None = None,
    *,
    progress: bool = True,
    callbacks: Iterable[Callable[[dict[str, Any]], None]] = (),
    strategy: Any = None,
    init_from: str | Path | None = None,
    resume: bool = False,
    save_every: int = 1,
    keep: int = 3,
) -> FitResult:
    """Trains ``config``'s model on its dataset and evaluates on the test split every epoch.

    With a ``workdir`` it writes ``config.json``, ``metrics.jsonl`` (one line per epoch, flushed
    as it goes), Orbax checkpoints under ``checkpoints/`` (asynchronously, every ``save_every``
    epochs and after the last; the ``keep`` latest plus the best by test loss are kept),
    ``reconstructions.png`` and ``loss.png``. The first SIGINT or SIGTERM finishes the epoch,
    saves a checkpoint and raises :class:`~jaxae.errors.TrainingInterrupted`.

    Args:
        config: the run; ``config.epochs`` is the total, counting epochs done before a resume.
        workdir: output folder (None: train in memory only).
        progress: show a progress bar.
        callbacks: each gets every epoch's metrics record.
        strategy: a :class:`~jaxae.parallel.Strategy` or its name (default ``"none"``). In a
            multi-process run every process calls ``fit``; only the primary one (process 0)
            writes files and shows progress, and all of them take part in checkpointing.
        resume: continue the run in ``workdir`` from its latest complete checkpoint; the result
            is the one an uninterrupted run gives. A run already at ``config.epochs`` returns
            at once (``start_epoch >= config.epochs``).
        save_every: save a checkpoint every this many epochs.
        keep: how many of the latest checkpoints to keep (the best is kept besides).
        init_from: a folder holding a checkpoint (e.g. from ``jaxae convert``): start from its
            parameters with a fresh optimizer (see :func:`init_params_from`); ignored on resume.

    Raises:
        JaxaeError: bad settings or data (e.g. a batch larger than the split), nothing to
            resume or a checkpoint of a different run, or a non-finite loss (the last good
            checkpoint stays the latest).
        TrainingInterrupted: a SIGINT or SIGTERM stopped training after a checkpoint was saved.
    """
    from tqdm.auto import tqdm

    config.validate()
    if save_every < 1:
        raise JaxaeError(f"--save-every must be at least 1, got {save_every}")
    if keep < 1:
        raise JaxaeError(f"--keep must be at least 1, got {keep}")
    if resume and workdir is None:
        raise JaxaeError("resuming needs the workdir of the run to continue")
    out = Path(workdir) if workdir is not None else None
    if out is not None:
        from jaxae import checkpoint

        # Before loading anything: a wrong --resume or a taken workdir fails fast.
        if resume:
            checkpoint.check_resumable(out, config)
        else:
            checkpoint.check_fresh(out)
    train = load_dataset(config.dataset, "train", config.tfds_data_dir)
    test = load_dataset(config.dataset, "test", config.tfds_data_dir)
    if config.batch_size > len(train):
        raise JaxaeError(f"--batch-size {config.batch_size} is larger than the {len(train)}-image train split")
    from jaxae.parallel import Strategy, get_strategy

    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy or Strategy()
    strategy.check_batch_size(config.batch_size)
    progress = progress and strategy.is_primary
    input_dim = math.prod(train.image_shape)
    trainer, state = build(config, train.image_shape)
    if resume:
        state = checkpoint.restore_state(out, state, strategy=strategy)
    else:
        if init_from is not None:
            state = init_params_from(init_from, trainer, state)
        state = strategy.put_state(state)
    start_epoch = int(strategy.host_state(state).epoch)
    history = _previous_records(out, start_epoch) if resume else []
    if start_epoch >= config.epochs:
        return FitResult(trainer, strategy.host_state(state), history, 0.0, start_epoch)
    train_images = strategy.put_data(train.images.reshape(len(train), input_dim))
    test_images = strategy.put_data(test.images.reshape(len(test), input_dim))
    eval_batch = min(config.eval_batch_size, len(test))

    t0 = time.perf_counter()
    train_epoch = strategy.compile_epoch(trainer, state, train_images, config.batch_size)
    evaluate = strategy.compile_evaluate(trainer, state, test_images, eval_batch)
    compile_seconds = time.perf_counter() - t0

    metrics_file = None
    ckpts = None
    stop = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if strategy.is_primary:
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            _write_records(out / "metrics.jsonl", history)  # on resume: drops epochs past the checkpoint
            metrics_file = open(out / "metrics.jsonl", "a")
        ckpts = checkpoint.Checkpoints(out, keep=keep)
        stop = checkpoint.StopOnSignal().__enter__()

    bar = tqdm(
        range(start_epoch, config.epochs),
        initial=start_epoch,
        total=config.epochs,
        desc=f"{config.variant} on {config.dataset}",
        unit="epoch",
        disable=not progress,
    )
    try:
        for epoch in bar:
            if stop is not None and stop.signum is not None:
                break
            t_start = time.perf_counter()
            state, step_metrics = train_epoch(state, train_images)
            train_metrics = summarize_epoch(jax.device_get(step_metrics))
            t_train = time.perf_counter() - t_start
            test_metrics = {k: float(v) for k, v in jax.device_get(evaluate(state, test_images)).items()}
            _check_finite(epoch + 1, train_metrics, test_metrics, ckpts)
            record = {
                "epoch": epoch + 1,
                "step": int(strategy.host_state(state).step),
                **{f"train_{k}": v for k, v in train_metrics.items()},
                **{f"test_{k}": v for k, v in test_metrics.items()},
                "samples_per_s": len(train) / t_train,
                "seconds": time.perf_counter() - t_start,
            }
            history.append(record)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if ckpts is not None and ((epoch + 1) % save_every == 0 or epoch + 1 == config.epochs):
                ckpts.save(_host_copy(strategy, state), config, metrics={"test_loss": test_metrics["loss"]})
            for callback in callbacks:
                callback(record)
            bar.set_postfix(train_loss=f"{record['train_loss']:.4f}", test_loss=f"{record['test_loss']:.4f}")
        if stop is not None and stop.signum is not None:
            final = _host_copy(strategy, state)
            if int(final.epoch) > start_epoch and int(final.step) != ckpts.latest_step():
                ckpts.save(final, config, metrics={"test_loss": history[-1]["test_loss"]})
            raise _interrupted(stop.signum, config, final, ckpts)
    finally:
        if stop is not None:
            stop.__exit__()
        if metrics_file is not None:
            metrics_file.close()
        if ckpts is not None:
            ckpts.close()  # completes the save in flight

    if out is not None:
        from jaxae import plots

        if strategy.is_primary:
            plots.write_run_figures(out, trainer, strategy.host_state(state), test, history)
    return FitResult(trainer, strategy.host_state(state), history, compile_seconds, start_epoch)


def _host_copy(strategy: Any, state: TrainState) -> TrainState:
    """The state as a checkpoint holds it (a strategy may say how; else its host copy)."""
    return getattr(strategy, "checkpoint_state", strategy.host_state)(state)


def _check_finite(epoch: int, train_metrics: dict[str, float], test_metrics: dict[str, float], ckpts: Any) -> None:
    bad = {f"train {k}": v for k, v in train_metrics.items() if not math.isfinite(v)}
    bad.update({f"test {k}": v for k, v in test_metrics.items() if not math.isfinite(v)})
    if not bad:
        return
    # The diverged state is never saved; the last good checkpoint stays the latest.
    from jaxae import checkpoint

    where = "there is no earlier checkpoint"
    if ckpts is not None:
        ckpts.wait()
        step = ckpts.latest_step()
        if step is not None:
            where = f"the last good checkpoint is {checkpoint.step_dir(ckpts.workdir, step)} (step {step})"
    values = ", ".join(f"{k} = {v}" for k, v in bad.items())
    raise JaxaeError(
        f"training diverged at epoch {epoch} ({values}); that state was not saved, {where}. Try a smaller --lr"
    )


def _previous_records(out: Path, epochs_done: int) -> list[dict[str, Any]]:
    """The metrics of the epochs a resumed checkpoint holds (later lines are re-run)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
        if isinstance(record, dict) and record.get("epoch", epochs_done + 1) <= epochs_done:
            records.append(record)
    return records


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _interrupted(signum: int, config: TrainConfig, state: TrainState, ckpts: Any) -> Exception:
    import signal

    from jaxae import checkpoint
    from jaxae.errors import TrainingInterrupted

    epoch = int(state.epoch)
    ckpts.wait()
    step = ckpts.latest_step()
    name = signal.Signals(signum).name
    if step is None:
        return TrainingInterrupted(
            f"interrupted by {name} before the first epoch ended; no checkpoint was written",
            signum=signum,
            epoch=epoch,
            step=None,
            checkpoint=None,
        )
    path = str(checkpoint.step_dir(ckpts.workdir, step))
    return TrainingInterrupted(
        f"interrupted by {name} after epoch {epoch} of {config.epochs}; checkpoint saved in {path} (step {step})",
        signum=signum,
        epoch=epoch,
        step=step,
        checkpoint=path,
    )
