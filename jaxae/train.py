"""The pure training core: the config, the state, the jitted steps and an epoch as one ``lax.scan``.

The loop that drives it (data loading, checkpoints, signals, figures) is :func:`jaxae.loop.fit`.

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
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxae.config import MATMUL_PRECISIONS, MAX_SEED, TrainConfig, check_seed  # noqa: F401  (MAX_SEED: re-exported)
from jaxae.data import Normalization, get_normalization
from jaxae.errors import JaxaeError
from jaxae.models import image_shape_of
from jaxae.objectives import VARIANTS, Objective, check_model_contract, get_variant

# Independent random streams derived from a run's key (fold_in constants).
_PARAMS_STREAM, _DATA_STREAM, _STEP_STREAM = 0, 1, 2
_TRAIN_NOISE, _EVAL_NOISE = 0, 1


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, as one pytree (what a checkpoint saves).

    ``rng`` and ``data_rng`` are raw key data (``jax.random.key_data``) so the state
    serialises as plain arrays. Per-step randomness is ``fold_in(rng, step)`` and the data
    order of an epoch is ``fold_in(data_rng, epoch)``: a resumed run replays the same keys.

    ``image_shape`` is the ``(H, W, C)`` the model was built for: static (not an array, never
    traced), because an MLP's parameters know only ``H * W * C`` and a conv model's cannot tell
    ``32x16`` from ``16x32``; checkpoints save it so a restored model reads images the same way.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    epoch: jax.Array
    rng: jax.Array
    data_rng: jax.Array
    image_shape: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)


def _wrap(key_data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(key_data)


def example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
    """One key per example, from its dataset index: identical however a batch is split."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids)


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
    """The static half of training: model structure, optimizer, objective, normalisation.

    Its methods are pure functions of their array arguments; ``jit_*`` are their compiled
    forms. Build one with :func:`create_train_state`. ``matmul_precision`` is the
    ``jax.default_matmul_precision`` every step, evaluation and encoding is traced under
    (``"default"``, ``"high"``, ``"highest"``), whoever compiles it.
    """

    graphdef: Any
    tx: optax.GradientTransformation
    objective: Objective
    normalization: Normalization
    matmul_precision: str = "default"

    def precision(self):
        """The context the model's computations are traced in: the run's matmul precision."""
        return jax.default_matmul_precision(self.matmul_precision)

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
            per_example, metrics, *stats = self.objective.loss(self.model(params), x, keys)
            loss = _row_sum(per_example, mask) / count
            return loss, ({k: _row_sum(v, mask) / count for k, v in metrics.items()}, stats)

        with self.precision():
            (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            loss, metrics, grads = jax.lax.psum((loss, metrics, grads), axis_name)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if self.objective.update_state is not None:
            # State no gradient trains (an EMA codebook) is set from this step's statistics,
            # over the real rows of every device, after (and in place of) the optimizer's update.
            model = self.model(params)
            with self.precision():
                self.objective.update_state(model, stats[0], mask, lambda t: _global_sum(t, axis_name))
            params = nnx.to_pure_dict(nnx.state(model))
        if self.objective.summarize is not None:
            metrics = self.objective.summarize(metrics)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, {"loss": loss, "count": count, **metrics}

    # -- one epoch ------------------------------------------------------------------------

    def epoch_batches(
        self, state: TrainState, n: int, batch_size: int, first: Any = 0, steps: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """This epoch's example indices ``[steps, B]`` and mask ``[steps, B]``.

        With ``steps``, only the epoch's steps ``[first, first + steps)`` (``first`` may be
        traced): a part of the same epoch, drawn from the same permutation.
        """
        total = -(-n // batch_size)
        key = jax.random.fold_in(_wrap(state.data_rng), state.epoch)
        perm = jax.random.permutation(key, n).astype(jnp.int32)
        pad = total * batch_size - n
        ids = jnp.concatenate([perm, perm[:pad]]).reshape(total, batch_size)
        mask = (jnp.arange(total * batch_size) < n).astype(jnp.float32).reshape(total, batch_size)
        if steps is not None:
            ids = jax.lax.dynamic_slice_in_dim(ids, first, steps)
            mask = jax.lax.dynamic_slice_in_dim(mask, first, steps)
        return ids, mask

    @staticmethod
    def epoch_after(state: TrainState, n: int, batch_size: int, first: Any = 0, steps: int | None = None) -> jax.Array:
        """``state.epoch`` once steps ``[first, first + steps)`` are done: one more when they end the epoch."""
        if steps is None:
            return state.epoch + 1
        ends = first + steps >= -(-n // batch_size)
        return state.epoch + jnp.asarray(ends, state.epoch.dtype)

    def train_epoch(
        self, state: TrainState, images: jax.Array, batch_size: int, first: Any = 0, steps: int | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One pass over ``images`` (uint8 ``[N, D]`` on the device) as a ``lax.scan``.

        Returns the new state and per-step metrics (arrays of length ``ceil(N / B)``). With
        ``steps``, only the epoch's steps ``[first, first + steps)`` run (see :meth:`epoch_batches`);
        ``state.epoch`` moves on when they are its last.
        """
        n = images.shape[0]
        ids, mask = self.epoch_batches(state, n, batch_size, first, steps)

        def body(state, xs):
            ids_b, mask_b = xs
            return self.train_step(state, images[ids_b], mask_b, ids_b)

        new, metrics = jax.lax.scan(body, state, (ids, mask))
        return new.replace(epoch=self.epoch_after(state, n, batch_size, first, steps)), metrics

    def train_epoch_shard(
        self,
        state: TrainState,
        images: jax.Array,
        ids: jax.Array,
        mask: jax.Array,
        *,
        axis_name: str,
        epoch: Any = None,
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One epoch on one device of a data-parallel run (under ``pmap`` or ``shard_map``).

        Args:
            state: this device's copy of the (replicated) state.
            images: uint8 ``[N, D]``, the whole split, on this device.
            ids: this device's example indices ``[steps, B / devices]``, from :meth:`epoch_batches`.
            mask: this device's ``[steps, B / devices]`` mask of real (not padding) rows.
            axis_name: the device axis the loss and gradients are summed over.
            epoch: ``state.epoch`` afterwards (default: one more; see :meth:`epoch_after` for a
                part of an epoch).

        Returns:
            The new state and per-step metrics, identical on every device.
        """

        def body(state, xs):
            ids_b, mask_b = xs
            return self.train_step(state, images[ids_b], mask_b, ids_b, axis_name=axis_name)

        new, metrics = jax.lax.scan(body, state, (ids, mask))
        return new.replace(epoch=state.epoch + 1 if epoch is None else epoch), metrics

    def train_batches(
        self,
        state: TrainState,
        rows: jax.Array,
        ids: jax.Array,
        mask: jax.Array,
        *,
        axis_name: str | None = None,
        epoch: Any = None,
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Steps on batches given as rows (a chunk of a streamed epoch), as a ``lax.scan``.

        The step of :meth:`train_epoch` on the rows it would gather: ``rows`` uint8
        ``[steps, B, D]`` are ``images[ids]`` of the epoch's table (:meth:`epoch_batches`),
        ``ids`` and ``mask`` its ``[steps, B]`` (under ``shard_map``: this device's columns, with
        ``axis_name``). ``epoch``: ``state.epoch`` afterwards (default: unchanged).
        """

        def body(state, xs):
            rows_b, ids_b, mask_b = xs
            return self.train_step(state, rows_b, mask_b, ids_b, axis_name=axis_name)

        new, metrics = jax.lax.scan(body, state, (rows, ids, mask))
        return new.replace(epoch=state.epoch if epoch is None else epoch), metrics

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(
        self,
        state: TrainState,
        images: jax.Array,
        batch_size: int = 1000,
        *,
        first_id: Any = 0,
        rows: int | None = None,
        axis_name: str | None = None,
    ) -> dict[str, jax.Array]:
        """Mean of each of the objective's test metrics over ``images`` (uint8 ``[N, D]``).

        Randomness (noise, VAE samples) uses a fixed key per example, so every evaluation
        of the same parameters gives the same numbers. ``first_id``, ``rows`` and
        ``axis_name`` evaluate a split held in blocks across devices (see :meth:`mean_over`).
        """
        means = self.mean_over(
            state, images, self.objective.evaluate, batch_size, first_id=first_id, rows=rows, axis_name=axis_name
        )
        return means if self.objective.summarize is None else self.objective.summarize(means)

    def eval_keys(self, state: TrainState, example_ids: jax.Array) -> jax.Array:
        """The fixed per-example keys of evaluation (the same for every evaluation)."""
        return example_keys(jax.random.fold_in(_wrap(state.rng), _EVAL_NOISE), example_ids)

    def mean_over(
        self,
        state: TrainState,
        images: jax.Array,
        fn: Callable,
        batch_size: int = 1000,
        *,
        first_id: Any = 0,
        rows: int | None = None,
        axis_name: str | None = None,
    ) -> dict[str, jax.Array]:
        """Means over ``images`` of ``fn(model, x, keys) -> {name: [B]}``, chunk by chunk in a scan.

        Args:
            images: uint8 ``[N, D]``: the whole split, or (with ``rows``) one device's block of it.
            first_id: the split index of ``images[0]`` (a block starting further in).
            rows: the split's row count when ``images`` is a block of it; rows of the block at
                or past it are padding and count for nothing (default: ``len(images)``).
            axis_name: the device axis whose blocks' sums are added (under ``shard_map``).
        """
        local = images.shape[0]
        n = local if rows is None else rows
        batch_size = min(batch_size, local)
        steps = -(-local // batch_size)
        position = jnp.arange(steps * batch_size, dtype=jnp.int32)
        ids = position + first_id
        real = (position < local) & (ids < n)
        mask = real.astype(jnp.float32).reshape(steps, batch_size)
        # The row to read (in this block) and the key's example index (in the split).
        where = jnp.where(position < local, position, 0).reshape(steps, batch_size)
        ids = jnp.where(real, ids, 0).reshape(steps, batch_size)
        model = self.model(state.params)

        def body(_, xs):
            where_b, ids_b, mask_b = xs
            x = self.normalization(images[where_b].reshape(batch_size, -1))
            with self.precision():
                per_example = fn(model, x, self.eval_keys(state, ids_b))
            return None, {k: _row_sum(v, mask_b) for k, v in per_example.items()}

        _, sums = jax.lax.scan(body, None, (where, ids, mask))
        sums = _global_sum({k: jnp.sum(v, axis=0) for k, v in sums.items()}, axis_name)
        # A model with a NaN or Inf parameter has no meaningful metrics. Say so with NaN rather
        # than trust the arithmetic: XLA:CPU fuses a matmul with the ReLU after it into a kernel
        # that turns NaN into 0, so NaN weights can otherwise give a finite, plausible loss.
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(state.params)]))
        return {k: jnp.where(finite, v / n, jnp.nan) for k, v in sums.items()}

    # -- compiled forms -------------------------------------------------------------------

    @functools.cached_property
    def jit_train_step(self) -> Callable:
        """:meth:`train_step`, compiled. The state passed in is donated: its buffers are reused for
        the new state, so use only the returned one afterwards (``state, m = f(state, batch)``)."""
        return jax.jit(self.train_step, donate_argnums=0)

    @functools.cached_property
    def jit_train_epoch(self) -> Callable:
        """:meth:`train_epoch`, compiled (``batch_size`` static). The state passed in is donated,
        as with :attr:`jit_train_step`."""
        return jax.jit(self.train_epoch, static_argnames=("batch_size", "steps"), donate_argnums=0)

    @functools.cached_property
    def jit_evaluate(self) -> Callable:
        return jax.jit(self.evaluate, static_argnames="batch_size")

    def encode_batch(self, params: Any, batch: jax.Array) -> jax.Array:
        """Codes of a uint8 batch, normalised as in training."""
        with self.precision():
            return self.model(params).encode(self.normalization(batch.reshape(batch.shape[0], -1)))

    @functools.cached_property
    def jit_encode(self) -> Callable:
        # One compiled function per trainer: encode() is called for both splits (the probe),
        # and a jit made inside it would compile again on every call.
        return jax.jit(self.encode_batch)

    @functools.cached_property
    def jit_mean_over(self) -> Callable:
        return jax.jit(self.mean_over, static_argnames=("fn", "batch_size"))


def _row_sum(v: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_b mask[b] * v[b, ...]``: a per-example metric ``[B]`` (or ``[B, ...]``) summed over real rows.

    Rows of mask 0 are left out with ``where``, not multiplied by 0: a padding row (a repeated
    row, or the zeros past a split's end in a device's block) whose metric is NaN or infinite,
    e.g. the log of an all-zero image's mean, must not make the sum NaN. (Its gradient still
    would: training pads a batch with repeated real rows, never zeros.)
    """
    mask = mask.reshape(-1, *(1,) * (v.ndim - 1))
    return jnp.sum(jnp.where(mask != 0, v * mask, 0), axis=0)


def _global_sum(x: Any, axis_name: str | None) -> Any:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    objective: Objective | str = "vanilla",
    normalization: Normalization | str = "unit",
    seed: int = 0,
    *,
    image_shape: tuple[int, ...] | None = None,
    matmul_precision: str = "default",
) -> tuple[Trainer, TrainState]:
    """Splits ``model`` into a :class:`Trainer` (static) and a :class:`TrainState` (arrays).

    The model is checked against the contract of the objective's variant
    (:class:`~jaxae.models.AutoencoderModel`, :class:`~jaxae.models.VariationalModel`): one line
    names a missing method or an output of the wrong shape. Its parameters are copied, so the
    module stays usable after the jitted steps, which donate the state.

    Args:
        model: an NNX autoencoder (e.g. :class:`jaxae.Autoencoder`, or your own module).
        tx: an optax optimizer, e.g. ``optax.adam(1e-3)``.
        objective: an :class:`Objective` or a variant name (built with default settings).
        normalization: a :class:`Normalization` or a preset name (``"unit"``, ``"seed"``).
        seed: seeds the data order and the per-step randomness.
        image_shape: the ``(H, W, C)`` of the images the model takes (default: the model's
            ``image_shape`` attribute, if it has one); saved with checkpoints.
        matmul_precision: ``jax.default_matmul_precision`` of the steps (``"default"``,
            ``"high"``, ``"highest"``). A compute dtype is the model's own (``dtype=``).
    """
    if matmul_precision not in MATMUL_PRECISIONS:
        raise JaxaeError(f"unknown matmul precision {matmul_precision!r}; choose {' or '.join(MATMUL_PRECISIONS)}")
    if isinstance(normalization, str):
        normalization = get_normalization(normalization)
    if isinstance(objective, str):
        objective = get_variant(objective).build_objective(TrainConfig(variant=objective), normalization)
    image_shape = tuple(int(v) for v in image_shape) if image_shape is not None else _model_image_shape(model)
    if objective.name in VARIANTS:
        check_model_contract(model, objective.name, image_shape if image_shape and len(image_shape) == 3 else None)
    root = jax.random.key(check_seed(seed))
    graphdef, variables = nnx.split(model)
    # A copy: the jitted steps donate the state's buffers, and the module keeps working after them.
    params = jax.tree.map(jnp.array, nnx.to_pure_dict(variables))
    state = TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        epoch=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.fold_in(root, _STEP_STREAM)),
        data_rng=jax.random.key_data(jax.random.fold_in(root, _DATA_STREAM)),
        image_shape=image_shape,
    )
    return Trainer(graphdef, tx, objective, normalization, matmul_precision), state


def _model_image_shape(model: nnx.Module) -> tuple[int, ...] | None:
    shape = getattr(model, "image_shape", None)
    return tuple(int(v) for v in shape) if shape is not None else None


def build(
    config: TrainConfig, input_shape: int | tuple[int, ...], steps_per_epoch: int | None = None
) -> tuple[Trainer, TrainState]:
    """The model, optimizer and objective a config describes, freshly initialised.

    Args:
        config: the run's settings.
        input_shape: the image shape ``(H, W, C)``, or the flat input size (``784`` is taken as
            28x28x1).
        steps_per_epoch: the optimizer steps of an epoch, which a learning-rate schedule runs
            over (see :func:`make_optimizer`); not needed to evaluate or export.
    """
    variant = get_variant(config.variant)
    normalization = get_normalization(config.normalize)
    image_shape = image_shape_of(input_shape)
    _check_model_fits(config, image_shape)
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(check_seed(config.seed)), _PARAMS_STREAM))
    model = variant.build_model(config, image_shape, rngs)
    objective = variant.build_objective(config, normalization)
    return create_train_state(
        model,
        make_optimizer(config, steps_per_epoch),
        objective,
        normalization,
        config.seed,
        matmul_precision=config.matmul_precision,
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """The optax twin of ``torch.optim.Adam`` / ``AdamW`` with the config's settings.

    Adam's ``weight_decay`` is an L2 term added to the gradient before the moments
    (``add_decayed_weights`` first); AdamW's is decoupled, ``lr * wd * param`` added after them
    (``optax.adamw``). With no decay, schedule or clipping the chain is plain ``optax.adam``, as
    before these settings existed, so older checkpoints' optimizer states keep their structure.

    A learning-rate schedule (``config.lr_schedule``) and gradient clipping
    (``config.clip_grad_norm``) keep that state structure too: the update of the same optimizer
    at lr 1 is scaled by the schedule's value at Adam's own step count, and the gradient is
    clipped before it, as ``torch.nn.utils.clip_grad_norm_`` does (``max_norm / (norm + 1e-6)``,
    at most 1). So a resumed run may change its learning rate, its schedule or its clipping and
    still read its checkpoint.

    Args:
        config: the run's settings.
        steps_per_epoch: the optimizer steps of one epoch: a schedule runs over
            ``config.epochs * steps_per_epoch`` steps (needed only by ``cosine`` and
            ``warmup_cosine`` without ``config.schedule_steps``).
    """
    if config.lr_schedule == "constant" and not config.clip_grad_norm:
        return _adam(config, config.lr)
    if steps_per_epoch is None and config.lr_schedule != "constant" and not config.schedule_steps:
        # A state can still be made and restored (evaluate, export); a step says what is missing.
        def factor(count):
            lr_factor(config, None)

    else:
        factor = lr_factor(config, steps_per_epoch)
    return _scaled_by_schedule(_adam(config, 1.0), lambda count: config.lr * factor(count), config.clip_grad_norm)


def _adam(config: TrainConfig, lr: Any) -> optax.GradientTransformation:
    b1, b2 = config.betas
    if config.optimizer == "adamw":
        return optax.adamw(lr, b1, b2, config.eps, weight_decay=config.weight_decay)
    adam = optax.adam(lr, b1, b2, config.eps)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), adam)
    return adam


def lr_factor(config: TrainConfig, steps_per_epoch: int | None) -> Callable[[Any], Any]:
    """The schedule as a fraction of ``config.lr``: step count (updates done) -> factor in [0, 1].

    Raises:
        JaxaeError: a schedule over the run's steps without ``steps_per_epoch``, or a warm-up as
            long as the run.
    """
    if config.lr_schedule == "constant":
        return lambda count: 1.0
    total = schedule_length(config, steps_per_epoch)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(1.0, total)
    if config.warmup_steps >= total:
        length = (
            f"--schedule-steps {total}"
            if config.schedule_steps
            else f"the run ({total} steps: {config.epochs} epochs of {steps_per_epoch})"
        )
        raise JaxaeError(
            f"--warmup-steps {config.warmup_steps} is not shorter than {length}; give fewer warm-up steps or more "
            "--epochs"
        )
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, config.warmup_steps, total, end_value=0.0)


def schedule_length(config: TrainConfig, steps_per_epoch: int | None) -> int:
    """The optimizer steps ``config``'s schedule runs over: ``schedule_steps``, or the run's steps.

    Raises:
        JaxaeError: the run's steps are needed and ``steps_per_epoch`` is not given.
    """
    if config.schedule_steps:
        return config.schedule_steps
    if steps_per_epoch is None:
        raise JaxaeError(
            f"--lr-schedule {config.lr_schedule} runs over the run's steps: build the optimizer with steps_per_epoch"
        )
    return config.epochs * steps_per_epoch


def learning_rate(config: TrainConfig, steps_per_epoch: int | None, step: int) -> float:
    """The learning rate of update number ``step`` (0 = the first) of ``config``'s optimizer."""
    return float(config.lr * lr_factor(config, steps_per_epoch)(step))


def _adam_count(opt_state: Any) -> jax.Array:
    """The update count of the Adam inside an optimizer state (updates done so far)."""
    found = [
        s.count
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    return found[0]


def _scaled_by_schedule(
    base: optax.GradientTransformation, schedule: Callable[[Any], Any], clip_norm: float
) -> optax.GradientTransformation:
    """``base`` at lr 1, its update scaled by ``schedule(count)``, the gradient clipped first: the
    state is ``base``'s own (see :func:`make_optimizer`)."""

    def update(grads, state, params=None):
        if clip_norm:
            norm = optax.tree.norm(grads)
            # torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6), clamped to at most 1.
            coef = jnp.minimum(clip_norm / (norm + 1e-6), 1.0)
            grads = jax.tree.map(lambda g: g * coef.astype(g.dtype), grads)
        lr = schedule(_adam_count(state))
        updates, state = base.update(grads, state, params)
        return jax.tree.map(lambda u: u * jnp.asarray(lr, u.dtype), updates), state

    return optax.GradientTransformation(base.init, update)


# Training holds four float32 copies of every parameter: the values, the gradient and Adam's two moments.
_TRAINING_BYTES_PER_PARAMETER = 16


def _check_model_fits(config: TrainConfig, image_shape: tuple[int, ...]) -> None:
    """Refuses a model whose parameters and optimizer state alone exceed the device's memory.

    Counted on abstract shapes (nothing allocated): a huge --latent-dim or --hidden-dims would
    otherwise end in an allocation failure with a traceback, or the kernel killing the process.
    """
    variant = get_variant(config.variant)
    abstract = nnx.eval_shape(lambda: variant.build_model(config, image_shape, nnx.Rngs(params=0)))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param)))
    needed = _TRAINING_BYTES_PER_PARAMETER * count
    available = device_memory_bytes()
    if available is not None and needed > available:
        raise JaxaeError(
            f"the model has {count:,} parameters: training needs at least {needed / 2**30:,.1f} GiB for them and "
            f"Adam's state, more than the {available / 2**30:,.1f} GiB of {jax.local_devices()[0].platform} memory; "
            "use a smaller --latent-dim / --hidden-dims"
        )


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
    """How many bytes ``device`` can hold (an accelerator's limit, or the host's RAM for a CPU), if known.

    The default is this process's first device: ``jax.local_devices()``, not ``jax.devices()``,
    since in a multi-process run the first global device belongs to process 0, and asking
    another process's device for its memory fails.
    """
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement it
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not every platform reports it
            return None
    return None


def encode(trainer: Trainer, state: TrainState, images: np.ndarray | jax.Array, batch_size: int = 1000) -> np.ndarray:
    """Codes ``[N, latent]`` of uint8 images ``[N, ...]`` (normalised as in training)."""
    images = jnp.asarray(images)
    n = images.shape[0]
    return np.concatenate(
        [np.asarray(trainer.jit_encode(state.params, images[i : i + batch_size])) for i in range(0, n, batch_size)]
    )


def can_sample(trainer: Trainer, state: TrainState) -> bool:
    """Whether the model draws new images (``sample``): a VAE from its prior, a VQ-VAE from codes."""
    return callable(getattr(trainer.model(state.params), "sample", None))


def sample_pixels(
    trainer: Trainer,
    state: TrainState,
    n: int,
    key: jax.Array,
    *,
    prior: str | None = None,
    batch_size: int = 1000,
) -> np.ndarray:
    """``n`` images drawn from a generative model, flat ``[n, H * W * C]``, in [0, 1] pixel units.

    A VAE (a variant whose model is :class:`~jaxae.models.VariationalModel`) decodes its prior's
    draws to pixel means in [0, 1]; any other sampler (a VQ-VAE drawing codes, ``prior``
    ``"frequencies"`` or ``"uniform"``) decodes to the training inputs' units, mapped back to
    pixels and clipped to [0, 1]. Drawn ``batch_size`` at a time, chunk ``i`` from
    ``fold_in(key, i)``, so the same ``key`` and ``batch_size`` give the same images.
    """
    name = trainer.objective.name
    variational = name in VARIANTS and VARIANTS[name].variational
    args = () if prior is None else (prior,)
    norm = trainer.normalization

    @functools.partial(jax.jit, static_argnums=2)
    def draw(params, chunk_key, size):
        images = trainer.model(params).sample(chunk_key, size, *args)
        return images if variational else jnp.clip(norm.to_pixels(images), 0.0, 1.0)

    chunks = []
    for i, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        chunks.append(np.asarray(draw(state.params, jax.random.fold_in(key, i), size), np.float32))
    return np.concatenate(chunks).reshape(n, -1)


def summarize_epoch(step_metrics: dict[str, Any]) -> dict[str, float]:
    """Per-step metrics of one epoch -> their means over all examples."""
    count = np.asarray(step_metrics["count"], np.float64)
    total = count.sum()
    return {
        k: float(np.sum(np.asarray(v, np.float64) * count) / total) for k, v in step_metrics.items() if k != "count"
    }
