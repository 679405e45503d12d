"""The training loop: data, the compiled core, a parallel strategy, checkpoints, signals, figures.

:func:`fit` is what ``jaxae train`` runs. It ties together the layers below it: the dataset
(:mod:`jaxae.data`), the pure steps and epoch scan (:mod:`jaxae.train`), a data-parallel
strategy (:mod:`jaxae.parallel`), Orbax checkpoints (:mod:`jaxae.checkpoint`) and the figures
(:mod:`jaxae.plots`). Nothing below it imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# filelock: maintained, cross-platform, and its FileLock is an OS lock (flock(2) on Unix, LockFileEx
# on Windows) that the OS drops when the holding process dies, even by SIGKILL, so a crashed run never
# leaves its workdir blocked. A SoftFileLock (the file's existence is the lock) would need stale-lock
# guessing, which is exactly what must not go wrong here.
import filelock
import jax
from tqdm.auto import tqdm

from jaxae import checkpoint, parallel, plots
from jaxae.data import dataset_image_shape, load_dataset, shape_text
from jaxae.errors import DataError, JaxaeError, TrainingInterrupted
from jaxae.parallel import Strategy, get_strategy
from jaxae.train import TrainConfig, Trainer, TrainState, build, summarize_epoch

LOCK_FILE = checkpoint.LOCK_FILE


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


def check_run_settings(save_every: int, keep: int, resume: bool, workdir: str | Path | None) -> None:
    """Raises :class:`JaxaeError` for checkpoint settings no run can use (``fit`` and sweeps alike)."""
    if save_every < 1:
        raise JaxaeError(f"--save-every must be at least 1, got {save_every}")
    if keep < 1:
        raise JaxaeError(f"--keep must be at least 1, got {keep}")
    if resume and workdir is None:
        raise JaxaeError("resuming needs the workdir of the run to continue")


class WorkdirLock:
    """An exclusive lock on a run's workdir, held while a run writes there.

    Two runs on one workdir would write the same checkpoint steps and ``metrics.jsonl``; the
    second one to start is refused at once instead. :func:`fit` takes this lock for its whole
    run; a loop of your own can take it the same way::

        with WorkdirLock("runs/a"):
            ...  # train, save

    The lock is an OS file lock on ``WORKDIR/.jaxae.lock``, so it dies with its process (a killed
    run never blocks the next one). The holder's PID and host are written next to it for the
    message a refused run prints. In a multi-process run each process locks its own file
    (``.jaxae.process<I>.lock`` for process ``I > 0``), so the processes of one run share a
    workdir while a second run's processes are refused.

    Args:
        workdir: the run's folder; it must exist.
        process_index: this process's index in a multi-process run.
    """

    def __init__(self, workdir: str | Path, process_index: int = 0):
        self.workdir = Path(workdir)
        self.path = self.workdir / (LOCK_FILE if process_index == 0 else f".jaxae.process{process_index}.lock")
        self.holder_path = checkpoint.lock_holder_path(self.path)
        self._lock = filelock.FileLock(str(self.path), thread_local=False)

    def holder(self) -> str | None:
        """Who holds the lock, as ``"PID 123"`` (``"PID 123 on HOST"`` for another host); None if unknown."""
        holder = checkpoint.read_lock_holder(self.path)
        if holder is None:
            return None
        pid, host = holder
        return f"PID {pid}" if host == socket.gethostname() else f"PID {pid} on {host}"

    def acquire(self) -> WorkdirLock:
        """Takes the lock without waiting.

        Raises:
            JaxaeError: another run holds it, or the lock file cannot be created.
        """
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            who = self.holder() or "another process"
            raise JaxaeError(
                f"{self.workdir} is in use by another jaxae run ({who}); wait for it to end, or use another --workdir"
            ) from None
        except OSError as e:
            raise JaxaeError(f"cannot lock {self.path}: {e.strerror or e}") from None
        try:
            # A holder file left by a killed run is simply overwritten: its lock died with it.
            tmp = self.holder_path.with_name(f"{self.holder_path.name}.{os.getpid()}.tmp")
            tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
            os.replace(tmp, self.holder_path)
        except OSError:
            pass  # only the refusal message of another run loses the PID
        return self

    def release(self) -> None:
        """Releases the lock (the lock file stays, so every waiter locks the same file)."""
        if self._lock.is_locked:
            with contextlib.suppress(OSError):
                self.holder_path.unlink()  # while still holding it: no other run's holder file
            self._lock.release()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _workdir_path(workdir: str | Path | None) -> Path | None:
    if workdir is None:
        return None
    if not str(workdir).strip():
        # Path("") is the current folder: config.json, metrics.jsonl and the figures there would be overwritten.
        raise JaxaeError("--workdir is empty; name a folder for the run's outputs, e.g. --workdir runs/first")
    return Path(workdir)


def _why_unusable(out: Path, e: OSError) -> str:
    """The reason an OSError gives for ``out``, said in terms of the path the user gave."""
    if e.errno == errno.ENAMETOOLONG:
        return "a name in it is too long for the file system"
    for p in (out, *out.parents):
        try:
            if p.is_symlink() and not p.exists():
                return f"{p} is a symbolic link to {os.readlink(p)}, which does not exist"
            if p.exists() and not p.is_dir():
                return f"{p} is a file, not a folder"
        except OSError:
            continue  # this part cannot even be looked at: the error's own reason says why
    return e.strerror or str(e)


def check_workdir_writable(workdir: str | Path) -> None:
    """Creates ``workdir`` if needed and writes and removes a small file there.

    Raises:
        JaxaeError: it cannot be created or written (under a file, on a read-only file system,
            through a dangling symbolic link, a name too long, ...).
    """
    out = Path(workdir)
    probe = out / f".jaxae-write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"jaxae")
        probe.unlink()
    except OSError as e:
        raise JaxaeError(
            f"--workdir {out} cannot be used: {_why_unusable(out, e)}; pass a folder this process can create and write"
        ) from None


@contextlib.contextmanager
def _claim_workdir(out: Path, config: TrainConfig, resume: bool) -> Iterator[None]:
    """Checks ``out`` can hold this run and holds its :class:`WorkdirLock` while the run goes on.

    Everything here runs before any data is loaded or anything is compiled. A run that fails
    before writing anything leaves no folder behind that it created.
    """
    created = _missing_folders(out)
    try:
        with contextlib.ExitStack() as held:

            def check_and_lock() -> None:
                if resume and not out.is_dir():
                    checkpoint.check_resumable(out, config)  # says there is nothing to resume; creates nothing
                check_workdir_writable(out)
                held.enter_context(WorkdirLock(out, jax.process_index()))

            if jax.process_count() == 1:
                check_and_lock()
            else:
                # Every process must reach each collective below, so a process's own problem is
                # shared and raised everywhere instead of leaving the others waiting.
                problem = None
                try:
                    check_and_lock()
                except JaxaeError as e:
                    problem = str(e)
                parallel.check_shared_workdir(out, problem)
            # Under the lock: no other run is writing checkpoints while they are read.
            if resume:
                checkpoint.check_resumable(out, config)
            else:
                checkpoint.check_fresh(out)
            yield
    except BaseException:
        _remove_if_unused(created)
        raise


def _missing_folders(out: Path) -> list[Path]:
    """The folders from ``out`` up that do not exist yet, deepest first."""
    missing = []
    for p in (out, *out.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def _remove_if_unused(created: list[Path]) -> None:
    """Removes the folders a failed run created if they hold nothing but its own ``.jaxae*`` files."""
    if not created:
        return
    try:
        names = os.listdir(created[0])
        if not all(name.startswith(".jaxae") for name in names):
            return  # the run wrote something: keep it
        for name in names:
            os.remove(created[0] / name)
        for folder in created:
            os.rmdir(folder)
    except OSError:
        pass  # already gone, or another process is using it now


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
    saves a checkpoint and raises :class:`~jaxae.errors.TrainingInterrupted`. The workdir is
    checked (created, written) and locked (:class:`WorkdirLock`) before any data is loaded; in a
    multi-process run every process must see the same workdir (shared storage).

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
        JaxaeError: bad settings or data (e.g. a batch larger than the split), an empty or
            unwritable workdir, one another run holds, or (multi-process) one that is not shared,
            nothing to resume or a checkpoint of a different run, or a non-finite loss (the last
            good checkpoint stays the latest).
        TrainingInterrupted: a SIGINT or SIGTERM stopped training after a checkpoint was saved.
        CheckpointSaveError: a checkpoint could not be written (disk full, I/O error); training
            stops at the first failed save.
    """
    config.validate()
    check_run_settings(save_every, keep, resume, workdir)
    out = _workdir_path(workdir)
    with contextlib.ExitStack() as held:
        if out is not None:
            # Before loading anything: a bad, taken or already used workdir fails fast.
            held.enter_context(_claim_workdir(out, config, resume))
        return _fit(config, out, progress, callbacks, strategy, init_from, resume, save_every, keep)


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
) -> FitResult:
    # The image shape from the files' headers first: a model those images cannot feed (conv
    # sides not divisible by 4) fails before a large dataset is read.
    image_shape = dataset_image_shape(config.dataset, config.tfds_data_dir)
    trainer, state = build(config, image_shape)
    train = load_dataset(config.dataset, "train", config.tfds_data_dir)
    test = load_dataset(config.dataset, "test", config.tfds_data_dir)
    check_same_image_shape(image_shape, train, test)
    if config.batch_size > len(train):
        raise JaxaeError(f"--batch-size {config.batch_size} is larger than the {len(train)}-image train split")
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy or Strategy()
    strategy.check_batch_size(config.batch_size)
    progress = progress and strategy.is_primary
    input_dim = math.prod(image_shape)
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
        metrics_file, ckpts = open_run_outputs(out, config, history, keep, primary=strategy.is_primary)
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
            saving = ckpts is not None and ((epoch + 1) % save_every == 0 or epoch + 1 == config.epochs)
            if saving:
                # The previous save must be complete before this one starts anyway; waiting here
                # instead stops a run whose save failed (CheckpointSaveError) before it records more.
                ckpts.wait()
            history.append(record)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if saving:
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
        if strategy.is_primary:
            plots.write_run_figures(out, trainer, strategy.host_state(state), test, history)
    return FitResult(trainer, strategy.host_state(state), history, compile_seconds, start_epoch)


def open_run_outputs(
    out: Path, config: TrainConfig, history: list[dict[str, Any]], keep: int, *, primary: bool = True
) -> tuple[Any, checkpoint.Checkpoints]:
    """Opens a run's folder for training: ``config.json``, ``metrics.jsonl`` and its checkpoints.

    ``metrics.jsonl`` is rewritten to ``history`` first (on a resume that drops the epochs past
    the checkpoint) and returned open for appending; only the ``primary`` process writes files,
    while every process takes part in the checkpoints.

    Returns:
        The open ``metrics.jsonl`` (None when not ``primary``) and the run's :class:`~jaxae.checkpoint.Checkpoints`.
    """
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = None
    if primary:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        _write_records(out / "metrics.jsonl", history)
        metrics_file = open(out / "metrics.jsonl", "a")
    return metrics_file, checkpoint.Checkpoints(out, keep=keep)


def _host_copy(strategy: Any, state: TrainState) -> TrainState:
    """The state as a checkpoint holds it (a strategy may say how; else its host copy)."""
    return getattr(strategy, "checkpoint_state", strategy.host_state)(state)


def _check_finite(epoch: int, train_metrics: dict[str, float], test_metrics: dict[str, float], ckpts: Any) -> None:
    bad = {f"train {k}": v for k, v in train_metrics.items() if not math.isfinite(v)}
    bad.update({f"test {k}": v for k, v in test_metrics.items() if not math.isfinite(v)})
    if not bad:
        return
    # The diverged state is never saved; the last good checkpoint stays the latest.
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
    """The metrics of the epochs a resumed checkpoint holds (later lines are re-run).

    Lines that are not an epoch's record (cut short by a killed process, damaged bytes, no
    integer ``epoch``) are skipped with one warning: they never stop a resume.
    """
    path = out / "metrics.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        warnings.warn(f"cannot read {path} ({e.strerror}); it restarts with this run's epochs", stacklevel=3)
        return []
    records, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            skipped += 1
        elif epoch <= epochs_done:
            records.append(record)
    if skipped:
        warnings.warn(
            f"skipped {skipped} unreadable line{'s' * (skipped != 1)} of {path} (not an epoch's JSON record); "
            "the resumed run rewrites it without them",
            stacklevel=3,
        )
    return records


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _interrupted(
    signum: int, config: TrainConfig, state: TrainState, ckpts: Any, *, saved_in: str | Path | None = None
) -> Exception:
    """The :class:`TrainingInterrupted` to raise once the final save is complete.

    ``saved_in``: a sweep's folder, whose every model was saved; by default the checkpoint's own folder.
    """
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
    path = str(saved_in or checkpoint.step_dir(ckpts.workdir, step))
    what = "every model saved in" if saved_in else "checkpoint saved in"
    return TrainingInterrupted(
        f"interrupted by {name} after epoch {epoch} of {config.epochs}; {what} {path} (step {step})",
        signum=signum,
        epoch=epoch,
        step=step,
        checkpoint=path,
    )
