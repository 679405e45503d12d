"""Orbax checkpoints of a whole :class:`~jaxae.train.TrainState` plus the run's config, and
what makes training survive faults.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the pytree (params, optimizer
state, step, epoch and the two random keys, which fix the data order of every later epoch);
``meta`` is JSON: the run's config and input size (enough to rebuild the model before
restoring into it), the epoch, and a SHA-256 of the state, checked on every restore because a
damaged file can otherwise restore silently as wrong numbers. Once a save is complete,
``jaxae_files.json`` beside them lists every file's size, so a deleted or truncated file is
reported before anything is read.

Orbax writes each save into ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a
process killed mid-save leaves only a temporary folder, which is never read (and is removed
when training resumes). Old checkpoints are deleted only after the new one is complete.

Use from your own loop::

    from jaxae import checkpoint

    checkpoint.save("runs/mine", state, config)                 # blocks until written
    trainer, state, config = checkpoint.restore("runs/mine")     # the latest complete one

    with checkpoint.Checkpoints("runs/mine", keep=3) as ckpts:   # async, keeps 3 + the best
        for epoch in range(epochs):
            state, _ = trainer.jit_train_epoch(state, images, batch_size=256)
            ckpts.save(state, config, metrics={"test_loss": test_loss})
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from jaxae._version import __version__
from jaxae.errors import JaxaeError
from jaxae.models import image_shape_of
from jaxae.train import TrainConfig, Trainer, TrainState, build

CHECKPOINT_DIR = "checkpoints"
# Written into each step folder once its save is complete: every file's size, so a deleted or
# truncated file is found before Orbax reads it (a read failing halfway leaves Orbax's
# background reads behind, which print pages of errors when the process exits).
FILE_LIST = "jaxae_files.json"
FORMAT_VERSION = 1
BEST_METRIC = "test_loss"

# Config fields a resumed run may change: how long it trains, how it evaluates, and where
# the dataset lies. Every other field, including ones added later, must match the checkpoint.
RESUME_MAY_CHANGE = frozenset({"epochs", "eval_batch_size", "tfds_data_dir"})

# Test hook: seconds to hold every save between writing its files and committing it, so
# tests can kill a process in the middle of a save. Never set outside tests.
SLOW_SAVE_ENV = "JAXAE_TEST_SLOW_SAVE_SECONDS"


class DamagedCheckpointError(JaxaeError):
    """A checkpoint that exists but cannot be read back as it was saved.

    Attributes:
        step: the damaged checkpoint's step.
        older_steps: complete checkpoints before it, oldest first.
    """

    def __init__(self, message: str, step: int, older_steps: list[int]):
        super().__init__(message)
        self.step = step
        self.older_steps = older_steps


def checkpoint_dir(workdir: str | Path) -> Path:
    """``WORKDIR/checkpoints``, absolute (Orbax wants absolute paths)."""
    return Path(workdir).absolute() / CHECKPOINT_DIR


def step_dir(workdir: str | Path, step: int) -> Path:
    """The folder of one complete checkpoint."""
    return checkpoint_dir(workdir) / str(step)


def unfinished_saves(workdir: str | Path) -> list[Path]:
    """Temporary folders of saves that never completed (e.g. the process was killed)."""
    root = checkpoint_dir(workdir)
    return sorted(root.glob(f"*{atomicity.TMP_DIR_SUFFIX}*")) if root.is_dir() else []


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(FILE_LIST)
    }


def _check_files(workdir: str | Path, step: int, steps: list[int]) -> None:
    """Raises :class:`DamagedCheckpointError` if a file of the step's file list is gone or resized."""
    folder = step_dir(workdir, step)
    listing = folder / FILE_LIST
    if not listing.is_file():
        return  # a save from before file lists, or one killed right after its commit
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(workdir, step, steps, f"its file list {FILE_LIST} is unreadable") from e
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise _damaged(workdir, step, steps, f"{name} is missing")
        if path.stat().st_size != size:
            raise _damaged(workdir, step, steps, f"{name} has {path.stat().st_size} bytes, {size} when saved")


def input_shape_of(state: TrainState) -> list[int]:
    """The image shape ``[H, W, C]`` the model was built for, read off its parameters.

    An MLP's first kernel is ``[H * W * C, hidden]`` (square, one channel assumed, as the
    IDX datasets are); a conv model's is ``[3, 3, C, c1]``, and its ``project`` layer makes
    ``(H / 4) * (W / 4) * c2`` features for the decoder (square images).
    """
    params = state.params
    kernel = params["encoder"]["layers"][0]["kernel"]
    if kernel.ndim == 2:
        return list(image_shape_of(int(kernel.shape[0])))
    c2 = int(params["encoder"]["layers"][2]["kernel"].shape[-1])
    side = 4 * math.isqrt(int(params["project"]["kernel"].shape[-1]) // c2)
    return [side, side, int(kernel.shape[2])]


def input_dim_of(state: TrainState) -> int:
    """The flattened input size."""
    return math.prod(input_shape_of(state))


def _host_array(x: Any) -> np.ndarray | None:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # A global array of a multi-process run: only a replicated one has its whole value here.
        return np.asarray(x.addressable_data(0)) if x.is_fully_replicated else None
    return np.asarray(x)


def state_digest(state: TrainState) -> str | None:
    """SHA-256 over every leaf's path, dtype, shape and bytes (None if not all on this host)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        a = _host_array(leaf)
        if a is None:
            return None
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class _SlowCommit(atomicity.AtomicRenameTemporaryPath):
    """Holds a step's commit (the rename out of its temporary folder) for a while: tests only."""

    seconds = 0.0

    async def finalize(self, *args, **kwargs):
        if self.get_final().parent.name == CHECKPOINT_DIR:  # the step folder, not its items
            await asyncio.sleep(self.seconds)
        await super().finalize(*args, **kwargs)


def _manager(workdir: str | Path, *, keep: int | None = 3, read_only: bool = False) -> ocp.CheckpointManager:
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
        raise JaxaeError(f"cannot open the checkpoints in {checkpoint_dir(workdir)}: {_reason(e)}") from e


def _best_metric(metrics: dict[str, Any]) -> float:
    # A save whose metrics lack a test loss never counts as the best.
    value = metrics.get(BEST_METRIC) if isinstance(metrics, dict) else None
    return float(value) if value is not None else float("inf")


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    first = (lines[0] if lines else "").split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {first[:200]}"


class Checkpoints:
    """``WORKDIR/checkpoints`` as a training loop uses it: asynchronous saves, the ``keep``
    latest checkpoints plus the best one by test loss.

    ``save`` returns once the arrays are copied off the device; the files are written in the
    background while training goes on. Use it as a context manager (or call :meth:`close`) so
    the last save completes.

    Args:
        workdir: the run's folder; checkpoints go to ``WORKDIR/checkpoints``.
        keep: how many of the latest checkpoints to keep (the best one is kept as well).
    """

    def __init__(self, workdir: str | Path, *, keep: int = 3):
        self.workdir = Path(workdir)
        self.keep = keep
        self._mngr = _manager(workdir, keep=keep)
        self._unlisted: list[int] = []  # saved steps whose file list is not written yet

    def save(self, state: TrainState, config: TrainConfig, *, metrics: dict[str, float] | None = None) -> int:
        """Starts saving ``state`` (one ordinary copy, e.g. ``strategy.host_state(state)``).

        Args:
            state: the state to save; its ``step`` names the checkpoint.
            config: the run's config, saved with it.
            metrics: e.g. ``{"test_loss": ...}``; the checkpoint with the lowest test loss is
                kept however old it is.

        Returns:
            The step saved.

        Raises:
            JaxaeError: a checkpoint of that step exists already.
        """
        step = int(jax.device_get(state.step))
        if step in self._mngr.all_steps():
            raise JaxaeError(f"a checkpoint of step {step} exists already in {checkpoint_dir(self.workdir)}")
        meta = {
            "format": FORMAT_VERSION,
            "jaxae_version": __version__,
            "config": config.to_dict(),
            "input_dim": input_dim_of(state),
            "input_shape": input_shape_of(state),
            "step": step,
            "epoch": int(jax.device_get(state.epoch)),
            "state_sha256": state_digest(state),
            "metrics": metrics,
        }
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        # Always some metrics (Orbax warns without), an empty dict never being the best.
        self._list_files_of_finished_saves()  # Orbax would wait for the previous save here anyway
        self._mngr.save(step, args=args, metrics=dict(metrics or {}), force=True)
        self._unlisted.append(step)
        return step

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is complete on disk."""
        self._mngr.wait_until_finished()
        self._list_files_of_finished_saves()

    def _list_files_of_finished_saves(self) -> None:
        if not self._unlisted:
            return
        self._mngr.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unlisted:
                folder = step_dir(self.workdir, step)
                if folder.is_dir():  # not already pruned
                    tmp = folder / (FILE_LIST + ".tmp")
                    tmp.write_text(json.dumps({"files": _file_sizes(folder)}, indent=0))
                    os.replace(tmp, folder / FILE_LIST)
        self._unlisted = []

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (and the one in flight), oldest first."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest saved test loss."""
        return self._mngr.best_step()

    def close(self) -> None:
        """Waits for the save in flight and releases the manager."""
        self.wait()
        self._mngr.close()

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


def _damaged(workdir: str | Path, step: int, steps: list[int], why: str) -> DamagedCheckpointError:
    older = [s for s in steps if s < step]
    path = step_dir(workdir, step)
    if older:
        offer = (
            f"older complete checkpoints: steps {', '.join(map(str, older))}; read one with --step {older[-1]}, "
            f"or delete {path} and --resume continues from step {older[-1]}"
        )
    else:
        offer = "there is no older checkpoint to fall back on"
    return DamagedCheckpointError(f"checkpoint {path} is damaged ({why}); {offer}", step, older)


def _read_meta(mngr: ocp.CheckpointManager, workdir: str | Path, step: int, steps: list[int]) -> dict[str, Any]:
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
        raise _damaged(workdir, step, steps, _reason(e)) from e
    if not isinstance(meta, dict) or "config" not in meta or "input_dim" not in meta:
        raise _damaged(workdir, step, steps, "its metadata lacks the run's config")
    return meta


def read_meta(workdir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """The step and JSON metadata of a complete checkpoint (the latest when ``step`` is None).

    Raises:
        JaxaeError: no (such) checkpoint; :class:`DamagedCheckpointError` if it cannot be read.
    """
    mngr = _open(workdir)
    try:
        step, steps = _pick_step(mngr, workdir, step)
        _check_files(workdir, step, steps)
        return step, _read_meta(mngr, workdir, step, steps)
    finally:
        mngr.close()


def restore_state(
    workdir: str | Path, template: TrainState, step: int | None = None, *, strategy: Any = None
) -> TrainState:
    """Restores a checkpoint into the structure of ``template`` (a fresh state of the same
    model), placed as ``strategy`` places states.

    Where the strategy keeps the saved shapes (one device, or a replicated mesh) the arrays are
    read straight into its sharding; otherwise (``pmap``'s leading device axis) they are read
    onto one device and handed to ``strategy.put_state``. So a checkpoint saved under any
    strategy and device count restores under any other.

    Raises:
        JaxaeError: no (such) checkpoint; :class:`DamagedCheckpointError` if it does not
            restore or does not match its saved digest.
    """
    target = strategy.put_state(template) if strategy is not None else template
    same_shapes = all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(target), strict=True)
    )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target if same_shapes else template)
    mngr = _open(workdir)
    try:
        step, steps = _pick_step(mngr, workdir, step)
        _check_files(workdir, step, steps)
        meta = _read_meta(mngr, workdir, step, steps)
        try:
            state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        except Exception as e:
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
    workdir: str | Path, step: int | None = None, *, strategy: Any = None
) -> tuple[Trainer, TrainState, TrainConfig]:
    """Rebuilds the model from a checkpoint's config and restores its state into it.

    Args:
        workdir: a folder written by ``jaxae train`` (or :func:`save`).
        step: which checkpoint (default: the latest complete one).
        strategy: place the state as this :class:`~jaxae.parallel.Strategy` does (default:
            one device).

    Returns:
        The trainer, the restored state and the run's config.
    """
    _, meta = read_meta(workdir, step)
    config = TrainConfig.from_dict(meta["config"])
    trainer, fresh = build(config, tuple(meta.get("input_shape") or ()) or int(meta["input_dim"]))
    return trainer, restore_state(workdir, fresh, step, strategy=strategy), config


# -- resuming a run -------------------------------------------------------------------------


def _same_dataset(a: Any, b: Any) -> bool:
    if a == b:
        return True
    # The same folder written two ways (relative / absolute) is the same dataset.
    return isinstance(a, str) and isinstance(b, str) and os.path.isdir(a) and os.path.samefile(a, b)


def config_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """``"field: checkpoint X, now Y"`` for each field a resumed run may not change."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MAY_CHANGE:
            continue
        old, now = getattr(saved, f.name), getattr(new, f.name)
        same = _same_dataset(old, now) if f.name == "dataset" else _canonical(old) == _canonical(now)
        if not same:
            out.append(f"{f.name}: checkpoint {_canonical(old)!r}, now {_canonical(now)!r}")
    return out


def _canonical(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def check_resumable(workdir: str | Path, config: TrainConfig) -> tuple[int, dict[str, Any]]:
    """The latest checkpoint's step and metadata, if ``config`` may continue it.

    Raises:
        JaxaeError: no checkpoint, or one saved with a different model or setup (the message
            lists every difference).
    """
    step, meta = read_meta(workdir)
    saved = TrainConfig.from_dict(meta["config"])
    diffs = config_differences(saved, config)
    if diffs:
        raise JaxaeError(
            f"--resume: the checkpoint in {checkpoint_dir(workdir)} (step {step}) was saved by a different run: "
            f"{'; '.join(diffs)}. Pass the same settings (see {Path(workdir) / 'config.json'}) or use a new --workdir"
        )
    return step, meta


def check_fresh(workdir: str | Path) -> None:
    """Raises :class:`JaxaeError` if a new run would land on an earlier run's checkpoints."""
    steps = complete_steps(workdir)
    if steps:
        raise JaxaeError(
            f"{workdir} already holds checkpoints of a run (latest step {steps[-1]}); pass --resume to continue "
            "it, or use another --workdir (or delete that one) to start over"
        )


# -- interruption ----------------------------------------------------------------------------


class StopOnSignal:
    """While active, the first SIGINT or SIGTERM only sets :attr:`signum`, so the training loop
    can finish its epoch, save and exit cleanly; a second one stops the process at once (the
    complete checkpoints on disk stay valid). A signal the process ignores stays ignored.

    Only the main thread can handle signals; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                previous = signal.getsignal(s)
                if previous is signal.SIG_IGN:
                    continue
                self._previous[s] = previous
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            self.__exit__()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        # os.write, not print: the handler may run while the main thread is inside a print.
        os.write(
            sys.stderr.fileno(),
            f"\njaxae: {name}: finishing this epoch and saving a checkpoint (send it again to stop at once)\n".encode(),
        )

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
