"""One run: :func:`fit`, what ``jaxae train`` runs, and :func:`evaluate_run`, what ``jaxae evaluate`` runs.

:func:`fit` builds what a run needs from the layers below it: the dataset (:mod:`jaxae.data`),
the model and optimizer (:mod:`jaxae.train`, or your own), a data-parallel strategy
(:mod:`jaxae.parallel`), the run folder's claim and resume rules (:mod:`jaxae.rundir`), and a
resumed state (:mod:`jaxae.checkpoint`); the epochs are the one loop's (:mod:`jaxae.epochs`).
Nothing below it imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxae import checkpoint, rundir
from jaxae.data import (
    Dataset,
    SourceImages,
    check_streamable,
    dataset_image_shape,
    get_normalization,
    is_tfds_name,
    load_dataset,
    open_tfds_images,
    shape_text,
)
from jaxae.epochs import RUNNER_METHODS, EpochLoop, Member
from jaxae.errors import DataError, JaxaeError
from jaxae.objectives import check_model_contract, get_variant
from jaxae.parallel import ShardStrategy, Strategy, get_strategy, put_dataset

# The run folder's checks, re-exported where library users have always found them.
from jaxae.rundir import LOCK_FILE, WorkdirLock, check_run_settings, check_workdir_writable
from jaxae.stream import INPUTS, choose_input
from jaxae.train import (
    TrainConfig,
    Trainer,
    TrainState,
    build,
    create_train_state,
    learning_rate,
    make_optimizer,
)

__all__ = [
    "LOCK_FILE",
    "FitResult",
    "WorkdirLock",
    "check_same_image_shape",
    "check_workdir_writable",
    "evaluate_run",
    "fit",
    "init_params_from",
    "splits_in_memory",
]


def init_params_from(workdir: str | Path, trainer: Trainer, state: TrainState) -> TrainState:
    """``state`` with the parameters of the latest checkpoint in ``workdir`` and a fresh optimizer.

    The step, epoch and random streams stay ``state``'s: a fine-tuning run is a new run that
    starts from other weights.

    Raises:
        JaxaeError: no checkpoint there, or its parameters do not fit this run's model.
    """
    try:
        _, saved, saved_config = checkpoint.restore(workdir, image_shape=state.image_shape)
    except checkpoint.ImageShapeError as e:
        raise JaxaeError(f"--init-from {workdir}: {e}") from None
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


def check_same_image_shape(image_shape: tuple[int, ...], *splits: Any) -> None:
    """Raises :class:`~jaxae.errors.DataError` if a loaded split's images are not of the shape its
    headers gave a moment before (the files were replaced in between)."""
    for split in splits:
        if tuple(split.image_shape) != tuple(image_shape):
            raise DataError(
                f"{split.name} changed while it was read: its {split.split} images are "
                f"{shape_text(split.image_shape)}, its headers said {shape_text(image_shape)}"
            )


@dataclasses.dataclass
class FitResult:
    trainer: Trainer
    state: TrainState
    history: list[dict[str, Any]]
    compile_seconds: float
    start_epoch: int = 0  # epochs already done when this call began (non-zero on resume)
    input: str = "memory"  # where the train split lived: "memory" or "stream" (what --input auto chose)


def fit(
    config: TrainConfig,
    workdir: str | Path | None = None,
    *,
    model: Any = None,
    tx: Any = None,
    train: Any = None,
    test: Any = None,
    progress: bool = True,
    callbacks: Iterable[Callable[[dict[str, Any]], None]] = (),
    strategy: Any = None,
    init_from: str | Path | None = None,
    resume: bool = False,
    save_every: int = 1,
    keep: int = 3,
    figures: bool = True,
    events: bool = True,
    profile: str | Path | None = None,
    save_every_steps: int | None = None,
    input: str = "auto",
) -> FitResult:
    """Trains ``config``'s model on its dataset and evaluates on the test split every epoch.

    With a ``workdir`` it writes ``config.json``, ``metrics.jsonl`` (one line per epoch, flushed
    as it goes), Orbax checkpoints under ``checkpoints/`` (asynchronously, every ``save_every``
    epochs and after the last; the ``keep`` latest plus the best by test loss are kept),
    ``reconstructions.png`` and ``loss.png``. The first SIGINT or SIGTERM finishes the epoch,
    saves a checkpoint and raises :class:`~jaxae.errors.TrainingInterrupted`. The workdir is
    checked (created, written) and locked (:class:`WorkdirLock`) before any data is loaded; in a
    multi-process run every process must see the same workdir (shared storage).

    Your own model, optimizer and data go in as they are::

        model = MyAutoencoder(rngs=nnx.Rngs(0))          # any NNX module following AutoencoderModel
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
        result = jaxae.fit(config, "runs/mine", model=model, tx=tx, train=(x_train, None), test=(x_test, None))

    ``config`` then still says the objective (``variant`` and its settings), the batch size, the
    epochs, the normalisation and the seed (the data order and the noise); the checkpoints hold
    the state of your model and optimizer, and ``fit(..., resume=True)`` with the same model and
    optimizer continues it.

    Args:
        config: the run; ``config.epochs`` is the total, counting epochs done before a resume.
        workdir: output folder (None: train in memory only).
        model: an NNX module that follows the model contract (:class:`~jaxae.models.AutoencoderModel`,
            :class:`~jaxae.models.VariationalModel` for ``variant="vae"``), checked before training
            (default: the model ``config`` describes). Its parameters are copied: it stays usable.
        tx: any optax ``GradientTransformation`` (schedules, clipping, chains) (default: the
            optimizer ``config`` describes, :func:`~jaxae.train.make_optimizer`).
        train: the train split in memory: a :class:`~jaxae.data.Dataset` or ``(images, labels)``
            with ``labels`` possibly None (see :meth:`~jaxae.data.Dataset.from_arrays`); with
            ``test``, instead of ``config.dataset``, which records the split's name (``"arrays"``).
        test: the test split, likewise (evaluated every epoch); needed with ``train``.
        progress: show a progress bar.
        callbacks: each gets every epoch's metrics record.
        strategy: a :class:`~jaxae.parallel.Strategy` or its name (default ``"none"``). In a
            multi-process run every process calls ``fit``; only the primary one (process 0)
            writes files and shows progress, and all of them take part in checkpointing.
        resume: continue the run in ``workdir`` from its latest complete checkpoint; the result
            is the one an uninterrupted run gives. A run already at ``config.epochs`` returns
            at once (``start_epoch >= config.epochs``).
        save_every: save a checkpoint every this many epochs.
        save_every_steps: also save inside an epoch, every this many steps (at each multiple of it
            within the epoch), and heed a signal there: a preemption then loses at most this
            many steps, and ``resume`` continues inside the epoch to the uninterrupted result.
            Each part of an epoch is its own compiled scan, so a small value costs some speed
            (see docs/checkpoints.md). None: checkpoints and signals only at epoch ends.
        input: where the train split lives while it trains (:mod:`jaxae.stream`): ``"memory"``
            places it on the devices and runs each epoch as one compiled scan (the fast path);
            ``"stream"`` keeps it on the host (a plain IDX file memory-mapped) and sends the
            devices a few steps of rows at a time, for data larger than the devices' memory;
            ``"auto"`` chooses memory where the splits take at most half of the memory they would
            live in (a GPU's or TPU's; on CPU devices the host's available memory, within its
            cgroup), saying so where it streams (``FitResult.input`` holds the choice); every
            process of a run takes process 0's choice.
            The numbers are the same either way. Streaming runs with the ``none`` and ``shard``
            strategies; ``auto`` streams only with jaxae's own (a strategy of yours is fed in
            memory unless ``"stream"`` asks for its ``compile_stream``).
        keep: how many of the latest checkpoints to keep (the best is kept besides).
        init_from: a folder holding a checkpoint (e.g. from ``jaxae convert``): start from its
            parameters with a fresh optimizer (see :func:`init_params_from`); ignored on resume.
        figures: write the figures (reconstructions, loss curves) at the end.
        events: also write each epoch's record as TensorBoard scalars in ``<workdir>/events``.
        profile: trace the first epoch with ``jax.profiler`` into this folder (``*.xplane.pb``).

    Raises:
        JaxaeError: bad settings or data (e.g. a batch larger than the split), an empty or
            unwritable workdir, one another run holds, or (multi-process) one that is not shared,
            nothing to resume or a checkpoint of a different run, or a non-finite loss (the last
            good checkpoint stays the latest).
        TrainingInterrupted: a SIGINT or SIGTERM stopped training after a checkpoint was saved.
        CheckpointSaveError: a checkpoint could not be written (disk full, I/O error); training
            stops at the first failed save.
    """
    check_run_settings(save_every, keep, resume, workdir, save_every_steps)
    splits = splits_in_memory(train, test)
    if splits is not None:
        config = dataclasses.replace(config, dataset=splits[0].name)
    if model is not None:
        check_model_contract(model, config.variant)
        if config.dtype != "float32":
            raise JaxaeError(
                f"--dtype {config.dtype} sets the dtype of the models jaxae builds; a model of your own computes in "
                "the dtype it was built with (e.g. nnx.Linear(..., dtype=jnp.bfloat16)): leave dtype at float32"
            )
    out = rundir.workdir_path(workdir)
    with contextlib.ExitStack() as held:
        changed = {}
        if out is not None:
            # Before loading anything: a bad, taken or already used workdir fails fast.
            meta = held.enter_context(rundir.claim_workdir(out, config, resume, own_model=model is not None))
            if meta is not None:
                changed = rundir.resume_changes(type(config).from_dict(meta["config"]), config)
        return _fit(
            config,
            out,
            progress,
            callbacks,
            strategy,
            init_from,
            resume,
            save_every,
            keep,
            figures,
            changed,
            model=model,
            tx=tx,
            splits=splits,
            events=events,
            profile=profile,
            save_every_steps=save_every_steps,
            input=input,
        )


def _choose_input(requested: str, strategy: Any, train: Dataset, test: Dataset, progress: bool) -> str:
    """``memory`` or ``stream``; ``auto`` says why where it streams (on stderr, process 0).

    ``auto`` streams only with jaxae's own streaming strategies (a strategy of your own is fed
    the way its methods say: memory, unless ``input="stream"`` asks for its ``compile_stream``),
    and every process of a run takes process 0's choice, so they compile the same program.
    """
    streams = bool(getattr(strategy, "streams", False)) and hasattr(strategy, "compile_stream")
    if requested == "auto" and type(strategy) not in (Strategy, ShardStrategy):
        choice, why = "memory", f"--input auto chose memory: {type(strategy).__name__} is fed in memory"
    else:
        placed = 0
        if requested == "auto":
            placed = strategy.placed_bytes(train.images.nbytes) + strategy.placed_bytes(test.images.nbytes)
        choice, why = choose_input(requested, placed, jax.local_devices(), streams=streams)
    if jax.process_count() > 1 and requested == "auto":
        from jax.experimental import multihost_utils

        # Each process measured its own host; they must agree, or they compile different programs.
        choice = "stream" if int(multihost_utils.broadcast_one_to_all(np.int32(choice == "stream"))) else "memory"
    if choice == "stream" and not streams:
        own = isinstance(strategy, Strategy) and type(strategy).__module__ == Strategy.__module__
        name = strategy.name if own else type(strategy).__name__  # pmap for jaxae's; yours by its class
        raise JaxaeError(f"--input stream runs with --parallel none or shard, not {name}")
    if requested == "auto" and choice == "stream" and progress and strategy.is_primary:
        # Only the slower path is announced (memory is the default's usual choice); either way the
        # choice is FitResult.input and in the summary line of `jaxae train`.
        print(f"jaxae: {why}", file=sys.stderr)
    return choice


def splits_in_memory(train: Any, test: Any) -> tuple[Dataset, Dataset] | None:
    """``fit``'s ``train`` and ``test`` as :class:`Dataset` s, checked; None when neither is given."""
    if train is None and test is None:
        return None
    if train is None or test is None:
        given, missing = ("train", "test") if test is None else ("test", "train")
        raise JaxaeError(
            f"got {given}= but no {missing}=: give both splits in memory (test is evaluated every epoch), "
            "or neither to read config.dataset"
        )
    out = []
    for split, value in (("train", train), ("test", test)):
        if isinstance(value, Dataset):
            out.append(value)
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            out.append(Dataset.from_arrays(value[0], value[1], split=split))
        else:
            raise JaxaeError(
                f"{split}= must be a jaxae.Dataset or a pair (images, labels or None), got {type(value).__name__}"
            )
    check_same_image_shape(out[0].image_shape, out[1])
    return out[0], out[1]


def _fit(
    config: TrainConfig,
    out: Path | None,
    progress: bool,
    callbacks: Iterable[Callable[[dict[str, Any]], None]],
    strategy: Any,
    init_from: str | Path | None,
    resume: bool,
    save_every: int,
    keep: int,
    figures: bool,
    changed: dict[str, Any],
    *,
    model: Any,
    tx: Any,
    splits: tuple[Dataset, Dataset] | None,
    events: bool,
    profile: str | Path | None,
    save_every_steps: int | None = None,
    input: str = "memory",
) -> FitResult:
    if input not in INPUTS:
        raise JaxaeError(f"--input must be one of {', '.join(INPUTS)}, got {input!r}")
    if input == "stream" and splits is None:
        check_streamable(config.dataset)  # before anything is loaded
    if splits is not None:
        train, test = splits
        image_shape = train.image_shape
    else:
        # The image shape from the files' headers first: a model those images cannot feed (conv
        # sides not divisible by 4) fails before a large dataset is read.
        image_shape = dataset_image_shape(config.dataset, config.tfds_data_dir)
    if model is None:
        trainer, state = build(config, image_shape)
        if tx is not None:  # the config's model with your optimizer
            trainer = dataclasses.replace(trainer, tx=tx)
            state = state.replace(opt_state=tx.init(state.params))
    else:
        check_model_contract(model, config.variant, image_shape)
        normalization = get_normalization(config.normalize)
        objective = get_variant(config.variant).build_objective(config, normalization)
        trainer, state = create_train_state(
            model,
            tx or make_optimizer(config),
            objective,
            normalization,
            config.seed,
            image_shape=image_shape,
            matmul_precision=config.matmul_precision,
        )
    if splits is None:
        if is_tfds_name(config.dataset):
            # Read in place: what is decoded is what the strategy and input read (below).
            images = open_tfds_images(config.dataset, "train", config.tfds_data_dir)
            train = Dataset(images=images, labels=None, name=config.dataset, split="train")
        else:
            train = load_dataset(config.dataset, "train", config.tfds_data_dir)
        test = load_dataset(config.dataset, "test", config.tfds_data_dir)
        check_same_image_shape(image_shape, train, test)
    if config.batch_size > len(train):
        raise JaxaeError(f"--batch-size {config.batch_size} is larger than the {len(train)}-image train split")
    steps_per_epoch = -(-len(train) // config.batch_size)
    lr_of_step = None
    if tx is None:
        # The optimizer over this run's steps (a learning-rate schedule's length); its state is the same.
        trainer = dataclasses.replace(trainer, tx=make_optimizer(config, steps_per_epoch))
        learning_rate(config, steps_per_epoch, 0)  # a warm-up longer than the run is refused before compiling
        lr_of_step = functools.partial(learning_rate, config, steps_per_epoch)
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy or Strategy()
    missing = [name for name in ("put_state", "check_batch_size", *RUNNER_METHODS) if not hasattr(strategy, name)]
    if missing:
        raise JaxaeError(
            f"strategy= {type(strategy).__name__} lacks {', '.join(missing)}: give a jaxae.parallel.Strategy "
            "(subclass it to place the state and data your way) or its name"
        )
    strategy.check_batch_size(config.batch_size)
    input = _choose_input(input, strategy, train, test, progress)
    if isinstance(train.images, SourceImages) and input == "memory" and not isinstance(strategy, ShardStrategy):
        # Every row goes onto the devices: read the split once, with its progress bar. (shard
        # reads only this process's blocks of it; a stream only each batch's rows.)
        train = load_dataset(config.dataset, "train", config.tfds_data_dir)
    epoch_progress = None
    if resume:
        state = checkpoint.restore_state(out, state, strategy=strategy)
        # A checkpoint saved inside an epoch says where: the run goes on from there.
        epoch_progress = checkpoint.read_meta(out, int(strategy.host_state(state).step))[1].get("epoch_progress")
    else:
        if init_from is not None:
            state = init_params_from(init_from, trainer, state)
        state = strategy.put_state(state)
    at = strategy.host_state(state)
    start_epoch, start_step = int(at.epoch), int(at.step)
    history = rundir.previous_records(out, start_epoch) if resume else []
    if start_epoch >= config.epochs:
        return FitResult(trainer, at, history, 0.0, start_epoch)
    member = Member(config, trainer, out, history, lr_of_step, changed, own_model=model is not None)
    loop = EpochLoop(
        strategy, trainer, state, [member], train, test,
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size, save_every_steps=save_every_steps,
        input=input,
    )  # fmt: skip
    (final,) = loop.run(
        start_epoch=start_epoch,
        start_step=start_step,
        epochs=config.epochs,
        save_every=save_every,
        keep=keep,
        progress=progress,
        desc=f"{config.variant} on {config.dataset}",
        callbacks=[functools.partial(_one_record, c) for c in callbacks],
        events=events,
        profile=profile,
        resume_progress=epoch_progress,
    )
    if figures:
        loop.write_figures([final])
    return FitResult(trainer, final, history, loop.compile_seconds, start_epoch, input)


def _one_record(callback: Callable[[dict[str, Any]], None], records: list[dict[str, Any]]) -> None:
    callback(records[0])


def evaluate_run(
    workdir: str | Path,
    step: int | None = None,
    *,
    dataset: str | None = None,
    tfds_data_dir: str | None = None,
    iw_samples: int = 0,
    probe: bool = False,
    generation: bool = False,
    generation_samples: int | None = None,
    dtype: str | None = None,
    matmul_precision: str | None = None,
) -> dict[str, Any]:
    """``jaxae evaluate``: a run's test metrics, as the JSON object the command prints.

    Args:
        workdir: a folder written by ``jaxae train`` or ``jaxae convert``.
        step: which checkpoint (default: the latest complete one).
        dataset: evaluate on this dataset's test split, of the model's image shape (default: the run's).
        tfds_data_dir: TFDS data directory (with ``dataset``).
        iw_samples: a VAE's importance-weighted NLL bound with this many samples (``test_nll_iw``);
            the samples are decoded in chunks that fit the memory, announced on stderr.
        probe: add the linear probe's accuracies (:func:`~jaxae.probe.linear_probe`).
        generation: add ``"generation"``, the generation score of a model that samples
            (:func:`~jaxae.generation.generation_score`), its classifier cached in ``workdir``.
        generation_samples: its ``N`` (default: the test split's size, at most 10,000).
        dtype: compute in this dtype (default: the run's ``--dtype``).
        matmul_precision: at this ``--matmul-precision`` (default: the run's).

    Returns:
        ``{"step", "epoch", "dataset", "dtype", "matmul_precision", "test_<metric>": value, ...}``
        (and ``"generation": {"fd", "real_fd", "precision", "recall", ...}``); a metric is NaN where
        the model has non-finite parameters or outputs.
    """
    import sys

    from jaxae.generation import check_can_sample, generation_score
    from jaxae.objectives import importance_weighted_nll, iw_chunk
    from jaxae.probe import linear_probe

    trainer, state, config = rundir.restore_for_dataset(
        workdir, step, need_dataset=True, dataset=dataset, data_dir=tfds_data_dir, optimizer=False
    )
    if iw_samples:
        if not get_variant(config.variant).variational:
            raise JaxaeError(f"--iw-samples needs a vae or iwae run; {workdir} holds a {config.variant} model")
        if iw_samples < 1:
            raise JaxaeError(f"--iw-samples must be at least 1, got {iw_samples}")
    if generation_samples is not None and not generation:
        raise JaxaeError("--generation-samples sets the generation score's N: give it with --generation")
    if generation:
        check_can_sample(trainer, state)  # before any data is loaded or evaluated
    precision = {k: v for k, v in (("dtype", dtype), ("matmul_precision", matmul_precision)) if v is not None}
    if precision:
        config = dataclasses.replace(config, **precision)  # validated here, as a flag of train would be
        # The same parameters in a model of the new compute dtype, traced at the new precision.
        graphdef = build(config, state.image_shape)[0].graphdef
        trainer = dataclasses.replace(trainer, graphdef=graphdef, matmul_precision=config.matmul_precision)
    test = load_dataset(config.dataset, "test", config.tfds_data_dir)
    images = put_dataset(test.images.reshape(len(test), -1))
    metrics = trainer.jit_evaluate(state, images, batch_size=min(config.eval_batch_size, len(test)))
    out: dict[str, Any] = {
        "step": int(state.step),
        "epoch": int(state.epoch),
        "dataset": config.dataset,
        "dtype": config.dtype,
        "matmul_precision": config.matmul_precision,
    }
    out.update({f"test_{k}": float(v) for k, v in jax.device_get(metrics).items()})
    if iw_samples:
        batch = min(100, len(test))
        # Samples decoded in chunks that fit the memory: any K runs, a K that fits in one is unchunked.
        chunk = iw_chunk(config.arch, tuple(test.image_shape), batch)
        if chunk < iw_samples:
            print(
                f"jaxae: --iw-samples {iw_samples}: decoding {chunk} samples per image at a time "
                f"({-(-iw_samples // chunk)} chunks per batch of {batch} images)",
                file=sys.stderr,
            )
        fn = importance_weighted_nll(trainer.normalization, config.likelihood, iw_samples, chunk)
        nll = trainer.jit_mean_over(state, images, fn=fn, batch_size=batch)
        out["test_nll_iw"] = float(nll["nll_iw"])
        out["iw_samples"] = iw_samples
    train = load_dataset(config.dataset, "train", config.tfds_data_dir) if probe or generation else None
    if probe:
        out.update(linear_probe(trainer, state, train, test))
    if generation:
        out["generation"] = generation_score(
            trainer, state, train, test, samples=generation_samples, cache_dir=Path(workdir)
        )
    return out
