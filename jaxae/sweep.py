"""Many models as one compiled program: a grid of runs trained together, each an ordinary run.

:func:`fit_sweep` trains a list of :class:`~jaxae.config.TrainConfig` that differ only in
settings that keep the parameter shapes (:data:`SWEEPABLE`: the seed, the learning rate and
the objectives' weights). Their train states are stacked along a leading model axis and one
``jax.vmap`` of :meth:`Trainer.train_epoch <jaxae.train.Trainer.train_epoch>` trains them all
in one ``lax.scan`` per epoch; the dataset is an unmapped argument, held once per device.

Each model is the run ``jaxae train`` makes with its config: the same initialisation
(:func:`~jaxae.train.build` per model), data order (its own ``data_rng``) and per-step keys;
its learning rate and loss weights enter as per-model values instead of Python constants. The
batched matmuls round differently from one model's: the losses agree to ~1e-8 for the first
~100 steps, and training then grows the difference to the size of the spread between seeds.
Each model gets an ordinary workdir (``config.json``, ``metrics.jsonl``, Orbax checkpoints,
figures), so ``jaxae evaluate``, ``export`` and ``train --resume`` work on one of them, and
the sweep's folder gets ``summary.json`` (every run's final test metrics and each group's mean
and standard deviation over seeds).

On several devices the models are spread over the devices (a mesh axis ``models``, no
communication at all) when there are at least as many models as devices; a smaller grid
trains each model data-parallel over every device (the batch split along ``data`` and the
gradients summed, as ``--parallel shard`` does for one run).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import math
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxae import checkpoint, rundir
from jaxae.config import SHAPE_SETTINGS, SWEEPABLE, flag_of, shape_message
from jaxae.data import dataset_image_shape, get_normalization, load_dataset
from jaxae.epochs import EpochLoop, Member, json_safe
from jaxae.errors import JaxaeError
from jaxae.loop import check_same_image_shape, splits_in_memory
from jaxae.objectives import VARIANTS, get_variant
from jaxae.parallel import MESH_AXIS, put_dataset
from jaxae.rundir import (
    WorkdirLock,
    check_run_settings,
    check_workdir_writable,
    missing_folders,
    previous_records,
    remove_if_unused,
)
from jaxae.train import (
    TrainConfig,
    Trainer,
    TrainState,
    build,
    device_memory_bytes,
    learning_rate,
    make_optimizer,
)

#: The sweepable settings (:data:`~jaxae.config.SWEEPABLE`, declared in :mod:`jaxae.config`) that
#: are per-model values inside the compiled program: all but the seed.
HYPERPARAMETERS = SWEEPABLE[1:]

MODEL_AXIS = "models"
SUMMARY = "summary.json"
GRID_FILE = "sweep.json"
# Share of a device's memory a sweep may plan to use (the rest: XLA's temporaries, fragmentation).
MEMORY_FRACTION = 0.9


def sweep_configs(base: TrainConfig, **values: Sequence[Any]) -> list[TrainConfig]:
    """The grid of configs: ``base`` with every combination of ``values``.

    Example: ``sweep_configs(TrainConfig(epochs=3), seed=[0, 1, 2], lr=[1e-3, 5e-4])`` is six
    configs, seeds varying fastest within each learning rate.

    Args:
        base: the settings every model shares.
        **values: a list of values per setting of :data:`SWEEPABLE`.

    Raises:
        JaxaeError: a setting that is not sweepable (e.g. one that changes shapes), or an
            empty list.
    """
    for name, options in values.items():
        if name in SHAPE_SETTINGS:
            raise JaxaeError(shape_message(name))
        if name not in SWEEPABLE:
            raise JaxaeError(f"{flag_of(name)} cannot be swept; sweepable settings: {', '.join(SWEEPABLE)}")
        if len(options) == 0:
            raise JaxaeError(f"{flag_of(name)} needs at least one value")
    for name, options in values.items():
        for value in set(options):
            dataclasses.replace(base, **{name: value})  # each distinct value validated, as it is made
    # Seeds vary fastest, so the runs of one group sit next to each other.
    names = sorted(values, key=lambda n: (n == "seed", SWEEPABLE.index(n)))

    def config(combo: tuple) -> TrainConfig:
        # a copy with the swept fields set: dataclasses.replace would re-run __init__ per model
        made = copy.copy(base)
        made.__dict__.update(zip(names, combo, strict=True))
        return made

    return [config(combo) for combo in itertools.product(*(values[n] for n in names))]


def _with_setting(config: TrainConfig, name: str, value: Any) -> TrainConfig:
    """``config`` with one setting changed, without validating it again (the grid's configs are
    many; the value is one that was validated)."""
    made = copy.copy(config)
    made.__dict__[name] = value
    return made


def varying_settings(configs: Sequence[TrainConfig]) -> list[str]:
    """The sweepable settings whose value differs between ``configs``, in :data:`SWEEPABLE` order."""
    first = configs[0]
    return [n for n in SWEEPABLE if any(getattr(c, n) != getattr(first, n) for c in configs)]


def check_grid(configs: Sequence[TrainConfig]) -> None:
    """Raises :class:`JaxaeError` unless ``configs`` can train as one sweep.

    Every config must be valid, all must agree on everything but :data:`SWEEPABLE`, and a
    setting that varies must be one the variant uses. Linear in the grid's size: each distinct
    value is validated once.
    """
    if not configs:
        raise JaxaeError("a sweep needs at least one config")
    base = configs[0]

    fixed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SWEEPABLE]
    fixed_values = operator.attrgetter(*fixed)
    base_values = fixed_values(base)
    for config in configs:
        if fixed_values(config) != base_values:
            name = next(n for n, v in zip(fixed, base_values, strict=True) if getattr(config, n) != v)
            if name in SHAPE_SETTINGS:
                raise JaxaeError(shape_message(name))
            values = sorted({json.dumps(_plain(getattr(c, name))) for c in (base, config)})
            raise JaxaeError(
                f"the configs of a sweep differ in {name} ({', '.join(values)}); only "
                f"{', '.join(SWEEPABLE)} may differ: run one sweep per value"
            )
    varying = varying_settings(configs)
    used = get_variant(base.variant).settings
    ignored = [n for n in varying if n not in ("seed", "lr") and n not in used]
    if ignored:
        flag = flag_of(ignored[0])
        users = [v.name for v in VARIANTS.values() if ignored[0] in v.settings]
        raise JaxaeError(
            f"{flag} does not change the {base.variant} variant's training, so its models would be identical; "
            f"it is a setting of {' and '.join(users)}: sweep it with --variant {users[0]}"
        )
    names = [run_name(c, varying) for c in configs]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        duplicate = next(n for n in names if n in seen or seen.add(n))
        raise JaxaeError(f"the grid holds the same run twice ({duplicate}); give each setting distinct values")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def run_name(config: TrainConfig, varying: Sequence[str]) -> str:
    """A model's workdir name inside the sweep: its seed and the other settings that vary."""
    parts = [f"seed{config.seed}"] + [f"{n}{_short(getattr(config, n))}" for n in varying if n != "seed"]
    return "_".join(parts)


def _short(value: float) -> str:
    """``0.001`` for 1e-3; the full repr where the short form would merge two values."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


# -- memory ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """A rough plan of one device's memory for a sweep (bytes)."""

    data: int  # the train and test splits, once
    per_model: int  # state (params + Adam moments), gradients, a step's activations
    models_per_device: int

    @property
    def total(self) -> int:
        return self.data + self.per_model * self.models_per_device


def estimate_memory(
    config: TrainConfig, param_count: int, input_dim: int, data_bytes: int, models_per_device: int
) -> MemoryEstimate:
    """The memory a device needs for ``models_per_device`` models and the dataset.

    Per model: parameters, two Adam moments, gradients and an update (5 float32 copies), plus the
    larger of a train batch's activations with their gradients and an evaluation batch's
    activations. The activation count is rough (the MLP: every layer's width, in and out; the
    conv net: 64 feature values per pixel), good to a small factor, which is what a refusal
    before compiling needs.
    """
    widths = 2 * sum(config.hidden_dims) + config.latent_dim
    train_floats, eval_floats = (6 * input_dim + 4 * widths, 4 * input_dim + 2 * widths)
    if config.arch == "conv":
        train_floats, eval_floats = 128 * input_dim, 64 * input_dim
    eval_batch = config.eval_batch_size
    activations = max(config.batch_size * train_floats, eval_batch * eval_floats)
    per_model = 4 * (5 * param_count + activations)
    return MemoryEstimate(data_bytes, per_model, models_per_device)


def check_memory(estimate: MemoryEstimate, models: int, device: jax.Device) -> None:
    """Raises :class:`JaxaeError` when ``estimate`` does not fit in ``device``'s memory."""
    limit = device_memory_bytes(device)
    if limit is None or estimate.total <= MEMORY_FRACTION * limit:
        return
    dataset = f"the dataset {_gib(estimate.data)} once + " if estimate.data else ""
    raise JaxaeError(
        f"a sweep of {models} models needs about {_gib(estimate.total)} on each {device.platform} device "
        f"({dataset}{_gib(estimate.per_model)} per model x "
        f"{estimate.models_per_device} models) but one holds {_gib(limit)}, of which a sweep plans at most "
        f"{MEMORY_FRACTION:.0%} ({_gib(int(MEMORY_FRACTION * limit))}); sweep fewer models at once "
        "(e.g. fewer --seeds) or spread them over more devices"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# -- the compiled program ------------------------------------------------------------------------


def stack(trees: Sequence[Any]) -> Any:
    """Pytrees of equal structure -> one pytree whose leaves have a leading model axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, count: int) -> list[Any]:
    """The inverse of :func:`stack` (host arrays)."""
    host = jax.device_get(tree)
    return [jax.tree.map(lambda x, i=i: x[i], host) for i in range(count)]


@dataclasses.dataclass(frozen=True, eq=False)
class SweepProgram:
    """The static half of a sweep: one model structure, and per-model values for the settings
    that differ (``hyper``: name -> float32 ``[models]``), turned into a trainer inside the trace.
    """

    base: TrainConfig
    graphdef: Any
    hyper_names: tuple[str, ...]
    #: the optimizer steps of an epoch, which a learning-rate schedule runs over
    steps_per_epoch: int | None = None

    def trainer(self, hyper: dict[str, jax.Array]) -> Trainer:
        """The :class:`Trainer` of one model, its swept settings being (traced) scalars.

        Settings that do not vary stay Python numbers, so their code is the one ``jaxae train``
        compiles.
        """
        # The values were validated when the grid's configs were made; here they are tracers.
        config = copy.copy(self.base)
        config.__dict__.update(hyper)
        normalization = get_normalization(config.normalize)
        objective = get_variant(config.variant).build_objective(config, normalization)
        # The run's own optimizer (Adam or AdamW, its betas, eps and decay): optax scales the
        # update by -lr, and with a traced lr that is the same multiply.
        return Trainer(
            self.graphdef,
            make_optimizer(config, self.steps_per_epoch),
            objective,
            normalization,
            config.matmul_precision,
        )

    def train_epoch(self, state: TrainState, hyper: dict[str, jax.Array], images: jax.Array, batch_size: int):
        """Every model's epoch: ``state`` and ``hyper`` carry the model axis, ``images`` not."""
        return jax.vmap(lambda s, h: self.trainer(h).train_epoch(s, images, batch_size))(state, hyper)

    def evaluate(self, state: TrainState, hyper: dict[str, jax.Array], images: jax.Array, batch_size: int):
        """Every model's test metrics, ``{name: [models]}``."""
        return jax.vmap(lambda s, h: self.trainer(h).evaluate(s, images, batch_size))(state, hyper)

    def train_epoch_data_parallel(
        self, state: TrainState, hyper: dict[str, jax.Array], images: jax.Array, batch_size: int, mesh: Any
    ):
        """Every model's epoch, each one data-parallel over ``mesh``'s ``data`` axis."""
        n = images.shape[0]

        def device_epoch(state, hyper, images, ids, mask):
            def one(s, h, i, m):
                return self.trainer(h).train_epoch_shard(s, images, i, m, axis_name=MESH_AXIS)

            return jax.vmap(one)(state, hyper, ids, mask)

        sharded = jax.shard_map(
            device_epoch,
            mesh=mesh,
            in_specs=(P(), P(), P(), P(None, None, MESH_AXIS), P(None, None, MESH_AXIS)),
            out_specs=(P(), P()),
            check_vma=False,  # train_step's psum is the all-reduce, as in ShardStrategy
        )
        ids, mask = jax.vmap(lambda s, h: self.trainer(h).epoch_batches(s, n, batch_size))(state, hyper)
        columns = NamedSharding(mesh, P(None, None, MESH_AXIS))
        ids, mask = jax.sharding.reshard(ids, columns), jax.sharding.reshard(mask, columns)
        return sharded(state, hyper, images, ids, mask)


class Placement:
    """Where the stacked models and the dataset live, and the compiled epoch and evaluation.

    ``kind`` is ``"one device"``, ``"models over devices"`` (each device trains its own slice of
    the grid, no communication) or ``"data-parallel"`` (every model's batch split over the
    devices, gradients summed).
    """

    def __init__(self, models: int, strategy: str = "none", devices: list | None = None):
        if strategy not in ("auto", "none", "pmap", "shard"):
            raise JaxaeError(f"unknown parallel strategy {strategy!r}; choose one of auto, none, pmap, shard")
        if jax.process_count() > 1:
            raise JaxaeError("jaxae sweep runs in one process; start one sweep per host with its own --workdir")
        devices = list(devices or jax.devices())
        if strategy == "none" or len(devices) == 1:
            devices = devices[:1]
        self.devices = devices
        self.models = models
        if len(devices) == 1:
            self.kind = "one device"
            self.padded = models
        elif models >= len(devices):
            self.kind = "models over devices"
            # Pad to a multiple of the device count with copies of the last model (discarded).
            self.padded = -(-models // len(devices)) * len(devices)
        else:
            self.kind = "data-parallel"
            self.padded = models
        axis = MODEL_AXIS if self.kind == "models over devices" else MESH_AXIS
        self.mesh = jax.make_mesh((len(devices),), (axis,), devices=devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.model_sharded = NamedSharding(self.mesh, P(MODEL_AXIS)) if self.kind == "models over devices" else None

    @property
    def models_per_device(self) -> int:
        return self.padded // len(self.devices) if self.kind == "models over devices" else self.padded

    def describe(self) -> str:
        if self.kind == "one device":
            return f"{self.models} models on one {self.devices[0].platform} device"
        if self.kind == "models over devices":
            return f"{self.models} models spread over {len(self.devices)} devices ({self.models_per_device} each)"
        return f"{self.models} models, each data-parallel over {len(self.devices)} devices"

    def pad(self, tree: Any) -> Any:
        extra = self.padded - self.models
        if not extra:
            return tree
        return jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]), tree)

    def put_models(self, tree: Any) -> Any:
        """Host arrays with a model axis -> the devices (sharded along it or replicated)."""
        sharding = self.model_sharded or self.replicated
        return jax.device_put(self.pad(tree), sharding)

    def put_data(self, images: np.ndarray) -> jax.Array:
        return put_dataset(images, self.replicated)

    # -- a runner of the epoch loop (jaxae.epochs.Runner): one stack of models, in one process

    is_primary = True

    def compile_epoch(self, program: tuple[SweepProgram, Any], state: Any, images: jax.Array, batch_size: int):
        """``(state, images) -> (state, per-step metrics)`` of every model; ``program`` is the
        sweep's program and its per-model settings (placed by :meth:`put_models`)."""
        return self._bind(program, state, images, batch_size, "train_epoch")

    def compile_evaluate(self, program: tuple[SweepProgram, Any], state: Any, images: jax.Array, batch_size: int):
        """``(state, images) -> {metric: [models]}``."""
        return self._bind(program, state, images, batch_size, "evaluate")

    def _bind(self, program: tuple[SweepProgram, Any], state: Any, images: jax.Array, batch_size: int, fn: str):
        program, hyper = program
        compiled = self.compile(program, state, hyper, images, batch_size, fn)
        return lambda state, images: compiled(state, hyper, images)

    def host_values(self, tree: Any) -> list[Any]:
        return unstack(tree, self.models)

    def host_states(self, state: Any) -> list[TrainState]:
        return unstack(state, self.models)

    def checkpoint_states(self, state: Any) -> list[TrainState]:
        return [jax.tree.map(jnp.asarray, s) for s in unstack(state, self.models)]

    def compile(
        self, program: SweepProgram, state: Any, hyper: Any, images: jax.Array, batch_size: int, fn: str
    ) -> Callable:
        """``(state, hyper, images) -> ...`` of ``program``'s ``fn`` ("train_epoch" or "evaluate")."""
        if fn == "train_epoch" and self.kind == "data-parallel":
            if batch_size % len(self.devices):
                raise JaxaeError(
                    f"--batch-size {batch_size} is not divisible by the {len(self.devices)} devices each model is "
                    f"split over; use a multiple of {len(self.devices)}"
                )

            def body(s, h, x):
                return program.train_epoch_data_parallel(s, h, x, batch_size, self.mesh)
        else:
            method = getattr(program, fn)

            def body(s, h, x):
                return method(s, h, x, batch_size)

        if self.kind == "models over devices":
            # Each device runs the vmapped program on its own models: nothing crosses devices.
            body = jax.shard_map(
                body,
                mesh=self.mesh,
                in_specs=(P(MODEL_AXIS), P(MODEL_AXIS), P()),
                out_specs=P(MODEL_AXIS),
                check_vma=False,
            )
        donate = (0,) if fn == "train_epoch" else ()
        return jax.jit(body, donate_argnums=donate).lower(state, hyper, images).compile()


# -- the loop ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepResult:
    """What :func:`fit_sweep` returns.

    Attributes:
        configs: the grid, one config per model.
        workdirs: each model's workdir (None without a sweep workdir).
        states: each model's final state (host arrays).
        histories: each model's metrics records, one per epoch (as in ``metrics.jsonl``).
        summary: the content of ``summary.json``.
        placement: how the models ran ("one device", "models over devices", "data-parallel").
        compile_seconds: time to compile the epoch and the evaluation.
        start_epoch: epochs done before this call (non-zero on resume).
    """

    configs: list[TrainConfig]
    workdirs: list[Path | None]
    states: list[TrainState]
    histories: list[list[dict[str, Any]]]
    summary: dict[str, Any]
    placement: str
    compile_seconds: float
    start_epoch: int = 0


def fit_sweep(
    configs: Sequence[TrainConfig],
    workdir: str | Path | None = None,
    *,
    strategy: str = "none",
    devices: list | None = None,
    resume: bool = False,
    progress: bool = True,
    save_every: int = 1,
    keep: int = 3,
    figures: bool = True,
    callbacks: Sequence[Callable[[list[dict[str, Any]]], None]] = (),
    train: Any = None,
    test: Any = None,
    events: bool = True,
    profile: str | Path | None = None,
) -> SweepResult:
    """Trains every config of a grid (:func:`sweep_configs`) as one compiled program.

    Each model's numbers are those of :func:`jaxae.fit` with its config, to float32 rounding:
    batched matmuls round differently, and over hundreds of steps training grows that into a
    gap the size of the spread between seeds (see the Sweeps guide). With a ``workdir`` each model writes an ordinary run
    folder ``WORKDIR/<run name>`` (``config.json``, ``metrics.jsonl``, checkpoints, figures) and
    the sweep writes ``WORKDIR/sweep.json`` (the grid) and ``WORKDIR/summary.json``.

    Args:
        configs: the models; they may differ only in :data:`SWEEPABLE` settings.
        workdir: the sweep's folder (None: train in memory only).
        strategy: ``"none"`` (one device) or ``"auto"``/``"shard"``/``"pmap"``: all visible devices,
            models spread over them when there are at least as many models as devices, else each
            model data-parallel.
        devices: restrict to these devices.
        resume: continue the sweep in ``workdir`` (every model from its latest checkpoint).
        progress: show a progress bar.
        save_every: checkpoint every this many epochs (and after the last).
        keep: checkpoints kept per model (the best is kept besides).
        figures: write each model's ``reconstructions.png`` and ``loss.png`` at the end.
        events: also write each model's records as TensorBoard scalars in its ``events`` folder.
        profile: trace the first epoch with ``jax.profiler`` into this folder (``*.xplane.pb``).
        callbacks: each gets every epoch's list of per-model metrics records.
        train: the train split in memory (a :class:`~jaxae.data.Dataset` or ``(images, labels)``),
            with ``test``, as for :func:`jaxae.fit`; every model records the split's name as its dataset.
        test: the test split in memory.

    Raises:
        JaxaeError: a grid that cannot be one sweep, one that does not fit in memory (before
            anything is compiled), a taken workdir, or nothing to resume.
        TrainingInterrupted: SIGINT/SIGTERM stopped the sweep after every model was saved.
    """
    configs = list(configs)
    splits = splits_in_memory(train, test)
    if splits is not None:
        configs = [_with_setting(c, "dataset", splits[0].name) for c in configs]
    check_grid(configs)
    check_run_settings(save_every, keep, resume, workdir)
    placement = Placement(len(configs), strategy, devices)
    image_shape = check_size(configs[0], len(configs), placement, splits[0].image_shape if splits else None)
    varying = varying_settings(configs)
    names = [run_name(c, varying) for c in configs]
    out = Path(workdir) if workdir is not None else None
    run_dirs: list[Path | None] = [out / n if out is not None else None for n in names]
    grid = {"varying": varying, "runs": [{"workdir": n, **c.to_dict()} for n, c in zip(names, configs, strict=True)]}
    created: list[list[Path]] = []  # folders this call made, to remove if it fails before writing in them
    try:
        with contextlib.ExitStack() as held:
            diverged: dict[int, int] = {}
            changed: dict[int, dict] = {}
            if out is not None:
                # One sweep per folder, as one run per workdir, and each model's folder locked as a
                # train run's is: a second sweep, or a train run in the sweep or one of its models,
                # is refused at once instead of writing the same checkpoints and metrics.
                created.append(missing_folders(out))
                check_workdir_writable(out)
                held.enter_context(WorkdirLock(out))
                for d in run_dirs:
                    created.append(missing_folders(d))
                    d.mkdir(exist_ok=True)
                    held.enter_context(WorkdirLock(d))
                diverged, changed = _check_workdir(out, grid, run_dirs, configs, resume)
            return _train_sweep(
                configs, names, varying, out, run_dirs, grid, diverged, placement, image_shape,
                resume=resume, progress=progress, save_every=save_every, keep=keep, figures=figures,
                callbacks=callbacks, splits=splits, changed=changed, events=events, profile=profile,
            )  # fmt: skip
    except BaseException:
        for folders in reversed(created):
            remove_if_unused(folders)
        raise


def check_size(
    base: TrainConfig, models: int, placement: Placement | str = "none", image_shape: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """Refuses a grid of ``models`` models of ``base`` whose models alone do not fit, from its size.

    Nothing is read but the dataset's headers, nothing built but shapes: a grid far too large
    (tens of thousands of models) is refused in a moment, before its configs or folders are
    made. The dataset is counted too once it is loaded (:func:`fit_sweep`).

    Args:
        image_shape: the images' shape, for images in memory (default: read from ``base.dataset``).

    Returns:
        The dataset's image shape.
    """
    if isinstance(placement, str):
        placement = Placement(models, placement)
    if image_shape is None:
        image_shape = dataset_image_shape(base.dataset, base.tfds_data_dir)  # as fit: the model before the data
    shapes = jax.eval_shape(lambda: build(base, image_shape)[1].params)
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    estimate = estimate_memory(base, param_count, math.prod(image_shape), 0, placement.models_per_device)
    check_memory(estimate, models, placement.devices[0])
    return image_shape


def _train_sweep(
    configs: list[TrainConfig],
    names: list[str],
    varying: list[str],
    out: Path | None,
    run_dirs: list[Path | None],
    grid: dict,
    diverged: dict[int, int],
    placement: Placement,
    image_shape: tuple[int, ...],
    *,
    resume: bool,
    progress: bool,
    save_every: int,
    keep: int,
    figures: bool,
    callbacks: Sequence[Callable[[list[dict[str, Any]]], None]],
    splits: tuple[Any, Any] | None = None,
    changed: dict[int, dict] | None = None,
    events: bool = True,
    profile: str | Path | None = None,
) -> SweepResult:
    base = configs[0]
    trainer0, state0 = build(base, image_shape)
    if splits is not None:
        train, test = splits
    else:
        train = load_dataset(base.dataset, "train", base.tfds_data_dir)
        test = load_dataset(base.dataset, "test", base.tfds_data_dir)
        check_same_image_shape(image_shape, train, test)
    if base.batch_size > len(train):
        raise JaxaeError(f"--batch-size {base.batch_size} is larger than the {len(train)}-image train split")
    input_dim = math.prod(image_shape)
    param_count = sum(x.size for x in jax.tree.leaves(state0.params))
    data_bytes = train.images.nbytes + test.images.nbytes
    estimate = estimate_memory(base, param_count, input_dim, data_bytes, placement.models_per_device)
    check_memory(estimate, len(configs), placement.devices[0])

    states = [build(c, image_shape)[1] for c in configs]
    if resume:
        states = _restore(run_dirs, states, diverged)
    healthy = [i for i in range(len(configs)) if i not in diverged]
    start_epoch = int(states[healthy[0]].epoch) if healthy else base.epochs
    histories = [previous_records(d, start_epoch) if resume else [] for d in run_dirs]
    hyper_names = tuple(n for n in varying if n in HYPERPARAMETERS)
    steps_per_epoch = -(-len(train) // base.batch_size)
    program = SweepProgram(base, trainer0.graphdef, hyper_names, steps_per_epoch)
    for c in {c.lr for c in configs}:  # a warm-up longer than the run is refused before compiling
        learning_rate(dataclasses.replace(base, lr=c), steps_per_epoch, 0)
    hyper_host = {n: np.asarray([getattr(c, n) for c in configs], np.float32) for n in hyper_names}
    if start_epoch >= base.epochs:
        summary = _summary(names, configs, varying, histories, placement, diverged)
        if out is not None:
            _write_summary(out, summary)  # one a sweep stopped while drawing its figures lacks
        return SweepResult(configs, run_dirs, states, histories, summary, placement.kind, 0.0, start_epoch)

    members = [
        Member(
            c,
            SweepProgram(c, trainer0.graphdef, ()).trainer({}),
            d,
            h,
            functools.partial(learning_rate, c, steps_per_epoch),
            (changed or {}).get(i, {}),
        )
        for i, (c, d, h) in enumerate(zip(configs, run_dirs, histories, strict=True))
    ]
    loop = EpochLoop(
        placement, (program, placement.put_models(hyper_host)), placement.put_models(stack(states)), members,
        train, test, batch_size=base.batch_size, eval_batch_size=base.eval_batch_size,
    )  # fmt: skip
    compile_seconds = loop.compile_seconds
    if out is not None:
        _write_grid(out, grid, names, diverged)
    host_states = loop.run(
        start_epoch=start_epoch,
        start_step=start_epoch * steps_per_epoch,
        epochs=base.epochs,
        save_every=save_every,
        keep=keep,
        progress=progress,
        desc=f"sweep of {len(configs)} {base.variant} models",
        callbacks=callbacks,
        diverged=diverged,
        on_diverged=(lambda d: _write_grid(out, grid, names, d)) if out is not None else (lambda d: None),
        saved_in=out,
        events=events,
        profile=profile,
    )

    summary = _summary(names, configs, varying, histories, placement, diverged)
    if out is not None:
        _write_summary(out, summary)  # before the figures: an interrupted drawing leaves the summary
        if figures:
            loop.write_figures(host_states, diverged)
    return SweepResult(configs, run_dirs, host_states, histories, summary, placement.kind, compile_seconds, start_epoch)


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out / SUMMARY)


def _write_grid(out: Path, grid: dict, names: list[str], diverged: dict[int, int]) -> None:
    """``sweep.json``: the grid, and the models that diverged (by name, with the epoch), atomically."""
    record = {**grid, "diverged": {names[i]: e for i, e in sorted(diverged.items())}}
    tmp = out / (GRID_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / GRID_FILE)


def _check_workdir(
    out: Path, grid: dict, run_dirs: list, configs: list[TrainConfig], resume: bool
) -> tuple[dict[int, int], dict[int, dict]]:
    """Before loading anything: a taken folder, or a resume of another grid, fails fast.

    Returns the models a resumed sweep recorded as diverged (index -> epoch), and the settings
    a resumed model changes (index -> ``{setting: {"from", "to"}}``, as a resumed run records).
    """
    saved_grid = out / GRID_FILE
    names = [r["workdir"] for r in grid["runs"]]
    if resume:
        if not saved_grid.exists():
            raise JaxaeError(f"--resume: {out} holds no sweep ({GRID_FILE} is missing); start it without --resume")
        try:
            saved = json.loads(saved_grid.read_text())
            saved_names = [r.get("workdir") for r in saved.get("runs", [])]
            diverged = {names.index(n): int(e) for n, e in saved.get("diverged", {}).items() if n in names}
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise JaxaeError(f"--resume: cannot read {saved_grid}: {e}") from None
        if saved_names != names:
            raise JaxaeError(
                f"--resume: {out} holds a sweep of other runs ({', '.join(map(str, saved_names))}); pass the same "
                "lists as when it started, or use a new --workdir"
            )
        changed = {}
        for i, (d, c) in enumerate(zip(run_dirs, configs, strict=True)):
            if i not in diverged and checkpoint.complete_steps(d):  # a model with none yet starts over
                _, meta = rundir.check_resumable(d, c)
                changed[i] = rundir.resume_changes(type(c).from_dict(meta["config"]), c)
        return diverged, changed
    if saved_grid.exists():
        raise JaxaeError(
            f"{out} already holds a sweep ({saved_grid}); pass --resume to continue it, or use another --workdir"
        )
    for d in run_dirs:
        rundir.check_fresh(d)
    return {}, {}


def _restore(run_dirs: list[Path], fresh: list[TrainState], diverged: dict[int, int]) -> list[TrainState]:
    """Every model at the latest step all the healthy ones saved (a save round cut short is redone);
    all fresh if one has no checkpoint yet (the sweep was stopped in its first epoch). A diverged
    model keeps its fresh state: it is trained along, never saved or reported again."""
    healthy = [i for i in range(len(fresh)) if i not in diverged]
    saved = [set(checkpoint.complete_steps(run_dirs[i])) for i in healthy]
    common = set.intersection(*saved) if saved else set()
    if not common:
        return list(fresh)
    step = max(common)
    states = list(fresh)
    for i in healthy:
        states[i] = checkpoint.restore_state(run_dirs[i], fresh[i], step)
    return states


def _summary(
    names: list[str],
    configs: list[TrainConfig],
    varying: list[str],
    histories: list[list[dict]],
    placement: Placement,
    diverged: dict[int, int] | None = None,
) -> dict[str, Any]:
    """``runs`` (each model's settings, workdir and final test metrics) and ``groups`` (per setting
    other than the seed: ``n`` and each test metric's mean and sample standard deviation).

    A run whose loss stopped being finite carries ``diverged_at_epoch`` and is left out of its
    group's figures (the group counts it under ``diverged``).
    """
    diverged = diverged or {}
    shown = ["seed", *[n for n in varying if n != "seed"]]
    runs = []
    for i, (name, config, history) in enumerate(zip(names, configs, histories, strict=True)):
        final = history[-1] if history else {}
        run = {n: getattr(config, n) for n in shown}
        run["workdir"] = name
        run["epochs"] = final.get("epoch", 0)
        run.update({k: v for k, v in final.items() if k.startswith("test_")})
        if i in diverged:
            run["diverged_at_epoch"] = diverged[i]
        runs.append(run)
    group_keys = [n for n in shown if n != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[n] for n in group_keys), []).append(run)
    group_list = []
    for key, members in groups.items():
        group = dict(zip(group_keys, key, strict=True))
        # A diverged run's metrics are not finite: the group's figures are over the others.
        healthy = [m for m in members if "diverged_at_epoch" not in m]
        group["n"] = len(healthy)
        if len(healthy) < len(members):
            group["diverged"] = len(members) - len(healthy)
        metrics = sorted({k for m in healthy for k in m if k.startswith("test_")})
        for metric in metrics:
            values = np.asarray([m[metric] for m in healthy if metric in m], np.float64)
            group[f"{metric}_mean"] = float(values.mean())
            group[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        group["seeds"] = [m["seed"] for m in healthy]
        group_list.append(group)
    return {
        "models": len(configs),
        "varying": varying,
        "placement": placement.describe(),
        "std": "sample standard deviation over the group's runs (ddof=1; 0 for one run)",
        "runs": runs,
        "groups": group_list,
    }
