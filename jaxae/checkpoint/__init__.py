"""Orbax checkpoints of a whole :class:`~jaxae.train.TrainState` plus the run's config, and
what makes training survive faults.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the pytree (params, optimizer
state, step, epoch and the two random keys, which fix the data order of every later epoch);
``meta`` is JSON: the run's config and input size (enough to rebuild the model before
restoring into it), the epoch, a SHA-256 of the state and a SHA-256 of the metadata itself
(canonical JSON), checked on every restore because a damaged file can otherwise restore
silently as wrong numbers or a wrong config. Once a save is complete, ``jaxae_files.json``
beside them lists every file's size and SHA-256, so a deleted, truncated or overwritten file
(Orbax's own metadata files included) is reported before Orbax reads anything. A save refuses
a config that does not describe the state (other layer sizes, variant, architecture).

A save that fails (disk full, I/O error, permission) raises
:class:`~jaxae.errors.CheckpointSaveError` naming the last complete checkpoint; training stops
there. Orbax's background threads leave error logs and unraisable exceptions behind a failed
save or read; jaxae reports the failure itself, so those are not printed.

Orbax writes each save into ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a
process killed mid-save leaves only a temporary folder, which is never read (and is removed
when training resumes). Old checkpoints are deleted only after the new one is complete.

Use from your own loop::

    from jaxae import checkpoint

    checkpoint.save("runs/mine", state, config)                 # blocks until written
    trainer, state, config = checkpoint.restore("runs/mine")     # the latest complete one
    trainer, state, config = checkpoint.restore("runs/sgd", tx=optax.sgd(0.1, momentum=0.9))  # not Adam

    with checkpoint.Checkpoints("runs/mine", keep=3) as ckpts:   # async, keeps 3 + the best
        for epoch in range(epochs):
            state, _ = trainer.jit_train_epoch(state, images, batch_size=256)
            ckpts.save(state, config, metrics={"test_loss": test_loss})
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxae._version import __version__
from jaxae.checkpoint._orbax import _quiet_orbax_aftermath, _SlowCommit
from jaxae.checkpoint.integrity import (  # noqa: F401  (re-exported: the package's public API)
    CHECKPOINT_DIR,
    FILE_LIST,
    LOCK_FILE,
    DamagedCheckpointError,
    _canonical_json,
    _check_files,
    _damaged,
    _file_listing,
    _latest_of_a_live_run,
    _ListingError,
    checkpoint_dir,
    lock_holder_path,
    meta_digest,
    read_lock_holder,
    state_digest,
    step_dir,
    unfinished_saves,
)
from jaxae.checkpoint.shapes import (  # noqa: F401  (re-exported: the package's public API)
    IMAGE_SHAPE_FORMAT,
    ImageShapeError,
    OptimizerStateError,
    _check_image_shape,
    _check_optimizer,
    _params_shapes,
    _reason,
    _same_param_shapes,
    check_config_fits,
    input_dim_of,
    input_shape_of,
    saved_image_shape,
)
from jaxae.errors import CheckpointSaveError, JaxaeError
from jaxae.train import TrainConfig, Trainer, TrainState, build

# 1: the state's digest only. 2: also a digest of the metadata itself (``meta_sha256``).
# 3: ``input_shape`` is the image shape the model was built for; before, it was read off the
# parameters assuming square images (wrong for a 16x64 conv model, say), so it is not trusted.
FORMAT_VERSION = 3
# A checkpoint saved inside an epoch (its metadata says where): a jaxae that reads only format 3
# would resume it from the epoch's start, so it refuses this one and asks to be upgraded.
INSIDE_EPOCH_FORMAT = 4
READABLE_FORMAT = INSIDE_EPOCH_FORMAT
LEGACY_FORMAT = 1
BEST_METRIC = "test_loss"

# Test hook: seconds to hold every save between writing its files and committing it, so
# tests can kill a process in the middle of a save. Never set outside tests.
SLOW_SAVE_ENV = "JAXAE_TEST_SLOW_SAVE_SECONDS"


def _manager(workdir: str | Path, *, keep: int | None = 3, read_only: bool = False) -> ocp.CheckpointManager:
    _quiet_orbax_aftermath()
    if read_only:
        # Not Orbax's read_only mode, which warns on every use: this manager just never saves.
        options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    else:
        if keep is not None and keep < 1:
            raise JaxaeError(f"--keep must be at least 1, got {keep}")
        # The `keep` latest plus the best by test loss; checkpoints without metrics (written
        # by `save()` outside fit, or by the converter) age out with the latest ones.
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=keep),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=_best_metric, reverse=True, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        slow = float(os.environ.get(SLOW_SAVE_ENV, 0) or 0)
        temporary_path_class = type("_SlowCommitN", (_SlowCommit,), {"seconds": slow}) if slow > 0 else None
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric,  # makes Orbax store each save's metrics
            best_mode="min",
            preservation_policy=policy,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
            temporary_path_class=temporary_path_class,
        )
    try:
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
    except Exception as e:  # unreadable step metadata, permissions, ...
        raise _ListingError(f"cannot open the checkpoints in {checkpoint_dir(workdir)}: {_reason(e)}") from e


def _best_metric(metrics: dict[str, Any]) -> float:
    # A save whose metrics lack a test loss never counts as the best.
    value = metrics.get(BEST_METRIC) if isinstance(metrics, dict) else None
    return float(value) if value is not None else float("inf")


def _os_error_of(e: BaseException) -> int | None:
    """The errno behind a failed write, from an OSError or TensorStore's ``os_error_code``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os_error_code='?(\d+)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def _save_reason(e: BaseException) -> str:
    code = _os_error_of(e)
    if code is None:
        return _reason(e)
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


class Checkpoints:
    """``WORKDIR/checkpoints`` as a training loop uses it: asynchronous saves, the ``keep``
    latest checkpoints plus the best one by test loss.

    ``save`` returns once the arrays are copied off the device; the files are written in the
    background while training goes on. Use it as a context manager (or call :meth:`close`) so
    the last save completes.

    Args:
        workdir: the run's folder; checkpoints go to ``WORKDIR/checkpoints``.
        keep: how many of the latest checkpoints to keep (the best one is kept as well).
        own_model: the states are of a model (or optimizer) of your own, which the config does
            not describe: the config is saved for its other settings and the check that it
            builds the state's model is left out. Restore such a checkpoint with
            :func:`restore_state` into a state of the same model and optimizer.
    """

    def __init__(self, workdir: str | Path, *, keep: int = 3, own_model: bool = False):
        self.workdir = Path(workdir)
        self.keep = keep
        self.own_model = own_model
        self._mngr = _manager(workdir, keep=keep)
        self._unlisted: list[int] = []  # saved steps whose file list is not written yet
        self._failure: CheckpointSaveError | None = None  # once a save failed, nothing more is saved

    def save(
        self,
        state: TrainState,
        config: TrainConfig,
        *,
        metrics: dict[str, float] | None = None,
        progress: dict[str, Any] | None = None,
    ) -> int:
        """Starts saving ``state`` (one ordinary copy, e.g. ``strategy.host_state(state)``).

        Args:
            state: the state to save; its ``step`` names the checkpoint.
            config: the run's config, saved with it.
            metrics: e.g. ``{"test_loss": ...}``; the checkpoint with the lowest test loss is
                kept however old it is.
            progress: where inside an epoch ``state`` is (the epoch loop's ``epoch_step``,
                ``steps_per_epoch``, ``train_rows`` and the epoch's per-step metrics so far),
                saved as the metadata's ``"epoch_progress"``; None at an epoch's end.

        Returns:
            The step saved.

        Raises:
            JaxaeError: a checkpoint of that step exists already, or ``config`` does not
                describe ``state`` (other layer sizes, variant or architecture).
            CheckpointSaveError: this save, or the one before it, could not be written.
        """
        if self._failure is not None:
            raise self._failure
        step = int(jax.device_get(state.step))
        if step in self._mngr.all_steps():
            raise JaxaeError(f"a checkpoint of step {step} exists already in {checkpoint_dir(self.workdir)}")
        if not self.own_model:
            check_config_fits(state, config)
        meta = {
            "format": FORMAT_VERSION if progress is None else INSIDE_EPOCH_FORMAT,
            "jaxae_version": __version__,
            "config": config.to_dict(),
            "input_dim": input_dim_of(state),
            "input_shape": input_shape_of(state),
            "step": step,
            "epoch": int(jax.device_get(state.epoch)),
            "state_sha256": state_digest(state),
            "metrics": metrics,
        }
        if self.own_model:
            meta["own_model"] = True
        if progress is not None:
            meta["epoch_progress"] = progress
        meta["meta_sha256"] = meta_digest(meta)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._list_files_of_finished_saves()  # Orbax would wait for the previous save here anyway
        try:
            # Always some metrics (Orbax warns without), an empty dict never being the best.
            self._mngr.save(step, args=args, metrics=dict(metrics or {}), force=True)
        except Exception as e:
            raise self._failed(step, e) from e
        self._unlisted.append(step)
        return step

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is complete on disk.

        Raises:
            CheckpointSaveError: it (or an earlier one) could not be written.
        """
        if self._failure is not None:
            raise self._failure
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise self._failed(self._unlisted[-1] if self._unlisted else None, e) from e
        self._list_files_of_finished_saves()

    def _list_files_of_finished_saves(self) -> None:
        if not self._unlisted:
            return
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise self._failed(self._unlisted[-1], e) from e
        if jax.process_index() == 0:
            for step in self._unlisted:
                folder = step_dir(self.workdir, step)
                if folder.is_dir():  # not already pruned
                    tmp = folder / (FILE_LIST + ".tmp")
                    try:
                        tmp.write_text(json.dumps(_file_listing(folder), indent=0))
                        os.replace(tmp, folder / FILE_LIST)
                    except OSError as e:
                        tmp.unlink(missing_ok=True)
                        raise self._failed(step, e, what=f"writing the file list of checkpoint {folder}") from e
        self._unlisted = []

    def _failed(self, step: int | None, e: BaseException, what: str | None = None) -> CheckpointSaveError:
        """Records that saving ``step`` failed and returns the error to raise (once for all)."""
        complete = [s for s in sorted(self._mngr.all_steps()) if s != step and step_dir(self.workdir, s).is_dir()]
        if what is None:
            what = f"saving checkpoint {step_dir(self.workdir, step)} (step {step})" if step is not None else "a save"
        step = -1 if step is None else step
        if complete:
            last = (
                f"the last complete checkpoint is {step_dir(self.workdir, complete[-1])} (step {complete[-1]}); "
                "fix the cause and continue from it with --resume"
            )
        else:
            last = "no checkpoint was completed"
        self._failure = CheckpointSaveError(
            f"{what} failed: {_save_reason(e)}; training stopped, {last}",
            step=step,
            last_complete_step=complete[-1] if complete else None,
        )
        return self._failure

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (and the one in flight), oldest first."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest saved test loss."""
        return self._mngr.best_step()

    def close(self) -> None:
        """Waits for the save in flight and releases the manager.

        Raises:
            CheckpointSaveError: the save in flight failed (not again if already raised).
        """
        try:
            if self._failure is None:
                self.wait()
        finally:
            try:
                self._mngr.close()
            except Exception:
                # Orbax re-raises the failed save's error on close; it was raised once already.
                if self._failure is None:
                    raise

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save(
    workdir: str | Path, state: TrainState, config: TrainConfig, *, metrics: dict[str, float] | None = None
) -> int:
    """Saves ``state`` and ``config`` under ``WORKDIR/checkpoints/<step>`` and waits until the
    checkpoint is complete on disk.

    Older checkpoints are pruned as in training (the 3 latest plus the best are kept).

    Returns:
        The step saved.
    """
    with Checkpoints(workdir) as ckpts:
        return ckpts.save(state, config, metrics=metrics)


def complete_steps(workdir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``workdir``, oldest first (empty if none)."""
    if not checkpoint_dir(workdir).is_dir():
        return []
    mngr = _manager(workdir, read_only=True)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def _pick_step(mngr: ocp.CheckpointManager, workdir: str | Path, step: int | None) -> tuple[int, list[int]]:
    root = checkpoint_dir(workdir)
    steps = sorted(mngr.all_steps())
    if not steps:
        partial = ", ".join(p.name for p in unfinished_saves(workdir))
        found = f" (only unfinished saves: {partial})" if partial else ""
        raise JaxaeError(f"no complete checkpoint in {root}{found}; train with --workdir {workdir} first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise JaxaeError(f"no checkpoint at step {step} in {root}; saved steps: {', '.join(map(str, steps))}")
    return step, steps


def _open(workdir: str | Path) -> ocp.CheckpointManager:
    root = checkpoint_dir(workdir)
    if not root.is_dir():
        raise JaxaeError(
            f"no checkpoints in {workdir} (expected a folder {root}); train with --workdir {workdir} first"
        )
    return _manager(workdir, read_only=True)


def _read_meta(mngr: ocp.CheckpointManager, workdir: str | Path, step: int, steps: list[int]) -> dict[str, Any]:
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
        raise _damaged(workdir, step, steps, _reason(e)) from e
    if not isinstance(meta, dict):
        raise _damaged(workdir, step, steps, "its metadata is not a JSON object")
    if not (meta.get("format") == LEGACY_FORMAT and "meta_sha256" not in meta):
        # Format 2 on: the metadata carries its own digest. Checked before any field is used, so
        # a flipped bit is reported as damage, not as an unknown setting or a different run.
        if meta.get("meta_sha256") != meta_digest(meta):
            raise _damaged(workdir, step, steps, "its metadata does not match the digest saved with it")
        if not isinstance(meta.get("format"), int) or meta["format"] > READABLE_FORMAT:
            raise JaxaeError(
                f"checkpoint {step_dir(workdir, step)} has format {meta.get('format')!r}, written by jaxae "
                f"{meta.get('jaxae_version')}; this jaxae ({__version__}) reads formats up to {READABLE_FORMAT}: "
                "upgrade jaxae"
            )
    if "config" not in meta or "input_dim" not in meta:
        raise _damaged(workdir, step, steps, "its metadata lacks the run's config")
    return meta


def read_meta(workdir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """The step and JSON metadata of a complete checkpoint (the latest when ``step`` is None).

    Raises:
        JaxaeError: no (such) checkpoint; :class:`DamagedCheckpointError` if it cannot be read.
    """

    def read(step: int | None) -> tuple[int, dict[str, Any]]:
        mngr = _open(workdir)
        try:
            step, steps = _pick_step(mngr, workdir, step)
            _check_files(workdir, step, steps)
            return step, _read_meta(mngr, workdir, step, steps)
        finally:
            mngr.close()

    return _latest_of_a_live_run(workdir, step, read)


# How many times a read of the latest checkpoint starts over when a running training deleted it meanwhile.
def restore_state(
    workdir: str | Path, template: TrainState, step: int | None = None, *, strategy: Any = None
) -> TrainState:
    """Restores a checkpoint into the structure of ``template``, placed as ``strategy`` places states.

    ``template`` is a fresh state of the same model and optimizer (its values are not used, only
    its structure, shapes and dtypes). Where the strategy keeps the saved shapes (one device, or a
    replicated mesh) the arrays are read straight into its sharding; otherwise (``pmap``'s
    leading device axis) they are read onto one device and handed to ``strategy.put_state``. So
    a checkpoint saved under any strategy and device count restores under any other. Every file
    and the arrays are checked against the digests saved with them.

    Args:
        workdir: a folder written by ``jaxae train`` or :func:`save`.
        template: a state of the checkpoint's model and optimizer, e.g. from
            :func:`~jaxae.train.build` or :func:`~jaxae.train.create_train_state`.
        step: which checkpoint (default: the latest complete one).
        strategy: place the state as this :class:`~jaxae.parallel.Strategy` does (default: one
            device).

    Returns:
        The saved state, in ``template``'s structure.

    Raises:
        JaxaeError: no (such) checkpoint, or one saved with another optimizer than
            ``template``'s; :class:`DamagedCheckpointError` if it does not restore or does not
            match its saved digests.

    Example:
        A run trained with SGD and momentum, restored into a fresh state of the same model::

            import optax
            from jaxae import Autoencoder, checkpoint, create_train_state
            from flax import nnx

            model = Autoencoder(rngs=nnx.Rngs(0))
            trainer, template = create_train_state(model, optax.sgd(0.1, momentum=0.9))
            state = checkpoint.restore_state("runs/sgd", template)
    """
    return _latest_of_a_live_run(workdir, step, lambda step: _restore_state(workdir, template, step, strategy))


def _checked_step(
    mngr: ocp.CheckpointManager, workdir: str | Path, step: int | None, template: TrainState
) -> tuple[int, list[int], dict[str, Any]]:
    """The step to restore, the complete steps and its metadata, once its files, metadata and
    image shape are checked against the digests and ``template``."""
    step, steps = _pick_step(mngr, workdir, step)
    _check_files(workdir, step, steps)
    meta = _read_meta(mngr, workdir, step, steps)
    _check_image_shape(workdir, step, meta, template)
    return step, steps, meta


def _restore_state(workdir: str | Path, template: TrainState, step: int | None, strategy: Any) -> TrainState:
    target = strategy.put_state(template) if strategy is not None else template
    same_shapes = all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(target), strict=True)
    )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target if same_shapes else template)
    mngr = _open(workdir)
    try:
        step, steps, meta = _checked_step(mngr, workdir, step, template)
        try:
            state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        except Exception as e:
            _check_optimizer(workdir, step, template)  # another optimizer is not damage
            raise _damaged(workdir, step, steps, _reason(e)) from e
    finally:
        mngr.close()
    single = strategy.host_state(state) if (strategy is not None and same_shapes) else state
    expected = meta.get("state_sha256")
    if expected is not None:
        actual = state_digest(single)
        if actual is not None and actual != expected:
            raise _damaged(workdir, step, steps, "its arrays do not match the digest saved with them")
    if strategy is not None and not same_shapes:
        state = strategy.put_state(state)
    return state


def restore(
    workdir: str | Path,
    step: int | None = None,
    *,
    strategy: Any = None,
    tx: optax.GradientTransformation | None = None,
    image_shape: tuple[int, ...] | None = None,
    optimizer: bool = True,
) -> tuple[Trainer, TrainState, TrainConfig]:
    """Rebuilds the model from a checkpoint's config and restores its state into it.

    The optimizer is rebuilt too: Adam with the config's learning rate, as ``jaxae train``
    uses. A checkpoint saved from your own loop with another optimizer needs it as ``tx``, or
    ``optimizer=False`` where its state is not needed (evaluating, exporting the weights).

    Args:
        workdir: a folder written by ``jaxae train`` (or :func:`save`).
        step: which checkpoint (default: the latest complete one).
        strategy: place the state as this :class:`~jaxae.parallel.Strategy` does (default:
            one device).
        tx: the optax optimizer the run was trained with (default: ``optax.adam(config.lr)``);
            the returned trainer uses it.
        image_shape: the ``(H, W, C)`` of the images the model is for, e.g. its dataset's
            (:func:`~jaxae.data.dataset_image_shape`): checked against the checkpoint's, and used
            for a checkpoint written before format 3, which recorded only a guess (default: the
            checkpoint's).
        optimizer: whether the optimizer's state is needed. With False, a checkpoint of another
            optimizer is read for its parameters, step, epoch and keys alone (each file is still
            checked against its digest) with a fresh optimizer state, so a run trained with any
            optax chain evaluates and exports.

    Returns:
        The trainer, the restored state and the run's config.

    Raises:
        JaxaeError: no (such) checkpoint, its optimizer state is not ``tx``'s, or its model is
            for other images than ``image_shape``; :class:`DamagedCheckpointError` if it cannot
            be read back as saved.

    Example::

        trainer, state, config = checkpoint.restore("runs/mine")
        trainer, state, config = checkpoint.restore("runs/sgd", tx=optax.sgd(0.1, momentum=0.9))
    """
    _, meta = read_meta(workdir, step)
    if meta.get("own_model"):
        raise JaxaeError(
            f"the checkpoint in {checkpoint_dir(workdir)} holds a model of your own, which its config does not "
            "describe: restore it with jaxae.checkpoint.restore_state(workdir, template), template being a state of "
            "that model and optimizer (jaxae.create_train_state(model, tx))"
        )
    try:
        config = TrainConfig.from_dict(meta["config"])
        shape = tuple(meta.get("input_shape") or ()) or int(meta["input_dim"])
        if image_shape is not None and (
            saved_image_shape(meta) is not None or _same_param_shapes(config, shape, tuple(image_shape))
        ):
            # A format-3 checkpoint's shape is checked against it on restore; an older one's was a
            # guess, and the images' shape replaces it where the parameters fit both.
            shape = tuple(image_shape)
        trainer, fresh = build(config, shape)
    except JaxaeError:
        raise
    except Exception as e:  # a format-1 checkpoint (no metadata digest) with damaged metadata
        raise JaxaeError(
            f"cannot rebuild the model of the checkpoint in {checkpoint_dir(workdir)}: {_reason(e)}"
        ) from e
    if tx is not None:
        trainer = dataclasses.replace(trainer, tx=tx)
        fresh = fresh.replace(opt_state=tx.init(fresh.params))
    try:
        return trainer, restore_state(workdir, fresh, step, strategy=strategy), config
    except OptimizerStateError:
        if optimizer:
            raise
    # Another optimizer's state: the parameters alone. Each file is still checked against its
    # digest; the digest of the whole state cannot be, without the state it covers.
    read = functools.partial(_restore_without_optimizer, workdir, fresh)
    return trainer, _latest_of_a_live_run(workdir, step, read), config


def _restore_without_optimizer(workdir: str | Path, template: TrainState, step: int | None) -> TrainState:
    """``template`` with a checkpoint's parameters, step, epoch and keys; its optimizer state is left unread."""
    fields = {name: getattr(template, name) for name in ("params", "step", "epoch", "rng", "data_rng")}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fields)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    mngr = _open(workdir)
    try:
        step, steps, _ = _checked_step(mngr, workdir, step, template)
        args = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
        try:
            got = mngr.restore(step, args=ocp.args.Composite(state=args)).state
        except Exception as e:
            raise _damaged(workdir, step, steps, _reason(e)) from e
    finally:
        mngr.close()
    return template.replace(**{name: got[name] for name in fields})
