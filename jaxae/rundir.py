"""A run's folder and its policy: the lock, the claim, the resume rules, the outputs.

:mod:`jaxae.checkpoint` stores and reads states; this module decides what a run in a folder may
do with them: which settings a resumed run takes from its checkpoint or refuses
(:func:`run_config`), whether a folder can hold a new run or continue one
(:func:`claim_workdir`), who holds it (:class:`WorkdirLock`), how a signal stops it
(:class:`StopOnSignal`), and its ``config.json`` and ``metrics.jsonl`` (:func:`open_run_outputs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# filelock: maintained, cross-platform, and its FileLock is an OS lock (flock(2) on Unix, LockFileEx
# on Windows) that the OS drops when the holding process dies, even by SIGKILL, so a crashed run never
# leaves its workdir blocked. A SoftFileLock (the file's existence is the lock) would need stale-lock
# guessing, which is exactly what must not go wrong here.
import filelock
import jax
import numpy as np

from jaxae import checkpoint, parallel
from jaxae.config import MODEL_SETTINGS, RESUME_MAY_CHANGE, TrainConfig, flag_of
from jaxae.errors import JaxaeError, TrainingInterrupted
from jaxae.train import TrainState


def saved_config(workdir: str | Path, config_class: type = TrainConfig) -> TrainConfig | None:
    """The config of the latest checkpoint in ``workdir``; None where there is none to read (the
    run that needs one says why, in its own words)."""
    try:
        _, meta = checkpoint.read_meta(workdir)
        return config_class.from_dict(meta["config"])
    except (JaxaeError, KeyError, TypeError):
        return None


def run_config(
    given: dict[str, Any],
    *,
    resume_from: str | Path | None = None,
    init_from: str | Path | None = None,
    config_class: type = TrainConfig,
) -> TrainConfig:
    """The config of a run from the settings given (the flags of ``jaxae train``).

    - ``resume_from``: the run continued. A setting not given is the checkpoint's. A given
      setting that defines the model or the data and differs from the checkpoint's is refused
      (one line naming the flag); one that shapes only what comes next (:data:`RESUME_MAY_CHANGE`:
      epochs, the learning rate and its schedule, evaluation) is used, and the run records the
      change.
    - ``init_from``: a checkpoint whose parameters a new run starts from: the model's settings
      (:data:`~jaxae.config.MODEL_SETTINGS`) not given are its.
    - neither: the defaults, then the settings given.

    Raises:
        JaxaeError: a setting given on resume that the run cannot change, or settings no run can use.
    """
    source = resume_from if resume_from is not None else init_from
    saved = saved_config(source, config_class) if source is not None else None
    if saved is None:
        return config_class(**given)
    if resume_from is None:
        taken = {name: getattr(saved, name) for name in MODEL_SETTINGS if name not in given}
        return config_class(**{**taken, **given})
    conflicts = [
        f"{flag_of(name)} {_shown(value)} (the checkpoint's is {_shown(getattr(saved, name))})"
        for name, value in given.items()
        if name not in RESUME_MAY_CHANGE and not same_setting(name, getattr(saved, name), value)
    ]
    if conflicts:
        raise JaxaeError(
            f"--resume: {'; '.join(conflicts)}: a resumed run keeps the settings that define its model and data. "
            f"Leave {'that flag' if len(conflicts) == 1 else 'those flags'} out to continue the run in {resume_from}, "
            "or train a new run in another --workdir"
        )
    given = dict(given)
    # A schedule's warm-up and length were the checkpoint's schedule's: a schedule without them has none.
    if given.get("lr_schedule", "warmup_cosine") != "warmup_cosine" and "warmup_steps" not in given:
        given["warmup_steps"] = 0
    if given.get("lr_schedule") == "constant" and "schedule_steps" not in given:
        given["schedule_steps"] = 0
    return dataclasses.replace(saved, **given)


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def resume_changes(saved: TrainConfig, config: TrainConfig) -> dict[str, dict[str, Any]]:
    """``{setting: {"from": old, "to": new}}`` for what a resumed run changed (the settings of
    :data:`RESUME_MAY_CHANGE` only: any other difference is refused before). ``epochs`` is not
    among them: a longer run is what every resume asks for, and its records stay those of the
    uninterrupted run. It is recorded where the run's schedule ran and runs over the run's length
    (``cosine``, ``warmup_cosine`` without ``schedule_steps``): there a resume that adds epochs
    stretches the rest of the schedule."""
    out = {}
    stretched = all(c.lr_schedule != "constant" and not c.schedule_steps for c in (saved, config))
    recorded = RESUME_MAY_CHANGE if stretched else RESUME_MAY_CHANGE - {"epochs"}
    for name in sorted(recorded):
        old, new = getattr(saved, name), getattr(config, name)
        if old != new:
            out[name] = {"from": plain(old), "to": plain(new)}
    return out


# -- resuming a run -------------------------------------------------------------------------


def _same_dataset(a: Any, b: Any) -> bool:
    if a == b or a is None:  # a conversion that recorded no dataset takes the one it is resumed on
        return True
    # The same folder or file written two ways (relative / absolute, a link) is the same dataset.
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.samefile(a, b)
    except OSError:  # a TFDS name, or a path that is gone
        return False


def same_setting(name: str, saved: Any, now: Any) -> bool:
    """Whether a setting's value ``now`` is the checkpoint's (``saved``)."""
    if name == "dataset":
        return _same_dataset(saved, now)
    return plain(saved) == plain(now)


def plain(v: Any) -> Any:
    """A setting's value as JSON holds it (tuples as lists)."""
    return list(v) if isinstance(v, tuple) else v


def config_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """``"--flag: checkpoint X, now Y"`` for each setting a resumed run may not change."""
    out = []
    for f in dataclasses.fields(new):
        if f.name in RESUME_MAY_CHANGE:
            continue
        old, now = getattr(saved, f.name), getattr(new, f.name)
        if not same_setting(f.name, old, now):
            out.append(f"{flag_of(f.name)}: checkpoint {plain(old)!r}, now {plain(now)!r}")
    return out


def check_resumable(workdir: str | Path, config: TrainConfig, *, own_model: bool = False) -> tuple[int, dict[str, Any]]:
    """The latest checkpoint's step and metadata, if ``config`` may continue it.

    ``own_model``: the run continues with a model of the user's (``fit(model=...)``).

    Raises:
        JaxaeError: no checkpoint, one saved with a different model or setup (the message
            lists every difference), or one of a model of the user's continued without it.
    """
    step, meta = checkpoint.read_meta(workdir)
    if meta.get("own_model") and not own_model:
        raise JaxaeError(
            f"--resume: the checkpoint in {checkpoint.checkpoint_dir(workdir)} (step {step}) holds a model of your "
            "own, which its config does not describe: continue it from Python with "
            "jaxae.fit(config, workdir, model=<the same module>, tx=<the same optimizer>, resume=True)"
        )
    saved = type(config).from_dict(meta["config"])
    diffs = config_differences(saved, config)
    if diffs:
        raise JaxaeError(
            f"--resume: the checkpoint in {checkpoint.checkpoint_dir(workdir)} (step {step}) was saved by a different run: "
            f"{'; '.join(diffs)}. Pass the same settings (see {Path(workdir) / 'config.json'}) or use a new --workdir"
        )
    return step, meta


def check_fresh(workdir: str | Path) -> None:
    """Raises :class:`JaxaeError` if a new run would land on an earlier run's checkpoints."""
    steps = checkpoint.complete_steps(workdir)
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

    In a multi-process run a signal often reaches one host only (a preempted machine). The loop
    asks :meth:`agreed` at every epoch boundary, which every process calls at the same point: a
    signal to any process stops all of them there, with one complete checkpoint, instead of one
    process leaving the others waiting in a collective forever.

    Only the main thread can handle signals; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stops_at: str = "this epoch") -> None:
        #: where the loop stops, for the message a signal prints ("this epoch", or a step inside it)
        self.stops_at = stops_at
        self.signum: int | None = None
        #: the signal came to another process of the run, not this one
        self.from_another_process = False
        self._previous: dict[int, Any] = {}

    def agreed(self) -> int | None:
        """The signal that stops the run at this boundary, the same in every process (None: go on).

        One process: :attr:`signum`. Several: an all-gather of every process's signal (a few
        bytes, once per epoch); each process must call it at the same points.
        """
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        everyone = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0))).ravel()
        received = [int(s) for s in everyone if s]
        if self.signum is not None:
            return self.signum
        if received:
            # Not self.signum: that is this process's own first signal, and a second one of its own
            # stops it at once; another host's signal must not make this host's first one its second.
            self.from_another_process = True
            return received[0]
        return None

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
            f"\njaxae: {name}: finishing {self.stops_at} and saving a checkpoint (send it again to stop at once)\n".encode(),
        )

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()


LOCK_FILE = checkpoint.LOCK_FILE


# -- the folder: lock, claim, outputs ---------------------------------------------------------


def check_run_settings(
    save_every: int, keep: int, resume: bool, workdir: str | Path | None, save_every_steps: int | None = None
) -> None:
    """Raises :class:`JaxaeError` for checkpoint settings no run can use (``fit`` and sweeps alike)."""
    if save_every < 1:
        raise JaxaeError(f"--save-every must be at least 1, got {save_every}")
    if save_every_steps is not None and save_every_steps < 1:
        raise JaxaeError(f"--save-every-steps must be at least 1, got {save_every_steps}")
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


def workdir_path(workdir: str | Path | None) -> Path | None:
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
def claim_workdir(
    out: Path, config: TrainConfig, resume: bool, *, own_model: bool = False
) -> Iterator[dict[str, Any] | None]:
    """Checks ``out`` can hold this run and holds its :class:`WorkdirLock` while the run goes on.

    ``own_model``: the run trains a model of the user's (see :func:`check_resumable`).

    Yields the metadata of the checkpoint a resumed run continues (None for a new run).

    Everything here runs before any data is loaded or anything is compiled. A run that fails
    before writing anything leaves no folder behind that it created.
    """
    created = missing_folders(out)
    try:
        with contextlib.ExitStack() as held:

            def check_and_lock() -> None:
                if resume and not out.is_dir():
                    check_resumable(out, config, own_model=own_model)  # nothing to resume; creates nothing
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
            meta = None
            if resume:
                _, meta = check_resumable(out, config, own_model=own_model)
            else:
                check_fresh(out)
            yield meta
    except BaseException:
        remove_if_unused(created)
        raise


def missing_folders(out: Path) -> list[Path]:
    """The folders from ``out`` up that do not exist yet, deepest first."""
    missing = []
    for p in (out, *out.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def remove_if_unused(created: list[Path]) -> None:
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


def open_run_outputs(
    out: Path,
    config: TrainConfig,
    history: list[dict[str, Any]],
    keep: int,
    *,
    primary: bool = True,
    own_model: bool = False,
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
        write_records(out / "metrics.jsonl", history)
        metrics_file = open(out / "metrics.jsonl", "a")
    return metrics_file, checkpoint.Checkpoints(out, keep=keep, own_model=own_model)


#: The folder of a run's TensorBoard event files, inside its workdir.
EVENTS_DIR = "events"


class EventWriter:
    """A run's records as TensorBoard scalars in ``<workdir>/events`` (``tensorboard --logdir``).

    Every number of a record is written at the record's step, under its own name (``test_loss``,
    ``train_loss``, ``lr``, ``samples_per_s``, ...). It uses ``tensorboardX``: it writes the
    standard event files with nothing but protobuf, while ``torch.utils.tensorboard`` needs
    PyTorch and ``tf.summary`` TensorFlow. A resumed run hides what an earlier process wrote
    past the checkpoint it resumes from (``purge_step``), as it rewrites ``metrics.jsonl``.
    """

    def __init__(self, workdir: Path, *, resumed_at_step: int = 0):
        from tensorboardX import SummaryWriter

        # One file per start (two writers in one second would share a name otherwise).
        self._writer = SummaryWriter(
            logdir=str(Path(workdir) / EVENTS_DIR),
            purge_step=resumed_at_step + 1 if resumed_at_step else None,
            filename_suffix=f".{os.getpid()}.step{resumed_at_step}",
        )

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in record.items():
            if name not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def previous_records(out: Path, epochs_done: int) -> list[dict[str, Any]]:
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


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def interrupted(
    signum: int,
    config: TrainConfig,
    state: TrainState,
    ckpts: Any,
    *,
    saved_in: str | Path | None = None,
    elsewhere: bool = False,
    epoch_step: tuple[int, int] | None = None,
) -> Exception:
    """The :class:`TrainingInterrupted` to raise once the final save is complete.

    ``saved_in``: a sweep's folder, whose every model was saved; by default the checkpoint's own folder.
    ``epoch_step``: ``(steps done, steps per epoch)`` of the epoch it stopped inside, if it did.
    """
    epoch = int(state.epoch)
    ckpts.wait()
    step = ckpts.latest_step()
    name = signal.Signals(signum).name + (" (sent to another process of the run)" if elsewhere else "")
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
    where = (
        f"after epoch {epoch}"
        if epoch_step is None
        else f"at step {epoch_step[0]} of {epoch_step[1]} of epoch {epoch + 1}"
    )
    return TrainingInterrupted(
        f"interrupted by {name} {where} of {config.epochs}; {what} {path} (step {step})",
        signum=signum,
        epoch=epoch,
        step=step,
        checkpoint=path,
    )


def restore_for_dataset(
    workdir: str,
    step: int | None,
    *,
    need_dataset: bool,
    dataset: str | None = None,
    data_dir: str | None = None,
    optimizer: bool = True,
):
    """``checkpoint.restore`` for the images of the run's dataset (or ``dataset``, replacing it in the
    returned config), whose shape is read from its headers.

    A checkpoint whose model is for other images (the dataset's files were replaced by images of
    another shape with as many values) is one line instead of numbers computed on misread
    pixels; an older checkpoint, which recorded only a guess of its image shape, takes the
    dataset's. Without ``need_dataset`` a dataset that cannot be read is passed over.
    """
    from jaxae.data import dataset_image_shape, shape_text

    _, meta = checkpoint.read_meta(workdir, step)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if dataset is None:
        dataset, data_dir = config.get("dataset", "mnist-sample"), config.get("tfds_data_dir")
    try:
        shape = dataset_image_shape(dataset, data_dir)
    except JaxaeError:
        if need_dataset:
            raise
        shape = None
    try:
        trainer, state, saved = checkpoint.restore(workdir, step, image_shape=shape, optimizer=optimizer)
    except checkpoint.ImageShapeError as e:
        raise JaxaeError(f"{e}; the {dataset} images are {shape_text(shape)} now") from None
    return trainer, state, dataclasses.replace(saved, dataset=dataset, tfds_data_dir=data_dir)
