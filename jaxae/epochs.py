"""The one epoch loop: every run, one model (:func:`jaxae.fit`) or a grid (:func:`jaxae.fit_sweep`).

:class:`EpochLoop` compiles a run's epoch and evaluation and trains epoch after epoch. It writes
each model's records (``metrics.jsonl``, callbacks, the progress bar), saves its checkpoints
(at epoch ends, and inside an epoch with ``save_every_steps``), stops every process at the same
boundary on a signal, handles a loss that stops being
finite, and draws the figures at the end. It knows nothing of how the models sit on the devices:
that is a :class:`Runner`'s, which a parallel strategy (:class:`jaxae.parallel.Strategy`, one
model) and a sweep's placement (:class:`jaxae.sweep.Placement`, a stack of models) implement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import resource
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxae import checkpoint, plots, rundir
from jaxae.data import Dataset
from jaxae.errors import JaxaeError
from jaxae.stream import Stream, chunk_lengths, host_table
from jaxae.train import TrainConfig, Trainer, TrainState, summarize_epoch

__all__ = ["RUNNER_METHODS", "EpochLoop", "Member", "Runner", "json_line", "json_safe"]


class Runner(Protocol):
    """Where a run's models and data live, and its compiled epoch and evaluation.

    ``program`` is what the runner compiles: a :class:`~jaxae.train.Trainer` for a strategy, a
    sweep's program and its per-model settings for a placement. Compiled functions take
    ``(state, images)``; their outputs carry one model or a leading model axis, which
    :meth:`host_values` splits.
    """

    @property
    def is_primary(self) -> bool:
        """True in the one process that writes files and shows progress."""
        ...

    def put_data(self, images: Any) -> jax.Array: ...

    def compile_epoch(
        self, program: Any, state: Any, images: jax.Array, batch_size: int, steps: int | None = None
    ) -> Callable:
        """``(state, images) -> (state, per-step metrics)``; with ``steps`` (a runner that saves inside
        an epoch), ``(state, images, first) -> ...`` over the epoch's steps ``[first, first + steps)``."""
        ...

    def compile_evaluate(self, program: Any, state: Any, images: jax.Array, batch_size: int) -> Callable: ...

    def host_values(self, tree: Any) -> list[Any]:
        """Outputs of a compiled function -> one host copy per model."""
        ...

    def host_states(self, state: Any) -> list[TrainState]:
        """The run's state -> each model's, on the host (figures, the result)."""
        ...

    def checkpoint_states(self, state: Any) -> list[TrainState]:
        """The run's state -> each model's, as :meth:`jaxae.checkpoint.Checkpoints.save` takes it
        (in a multi-process run: global arrays, and every process saves)."""
        ...


#: What the loop calls on a :class:`Runner`.
RUNNER_METHODS = (
    "is_primary", "put_data", "compile_epoch", "compile_evaluate", "host_values", "host_states", "checkpoint_states",
)  # fmt: skip


@dataclasses.dataclass
class Member:
    """One model of the loop, and its run folder (an ordinary run's, also inside a sweep).

    Attributes:
        config: its settings (written to ``config.json`` and every checkpoint).
        trainer: its trainer (the figures are drawn with it).
        workdir: its run folder (None: in memory only).
        history: its records so far (a resumed run's earlier epochs); the loop appends to it.
        lr: its learning rate at an optimizer step, recorded each epoch (None: not recorded).
        changed: the settings a resume changed (``{name: {"from", "to"}}``), recorded with the
            first epoch it trains.
        own_model: its model is the user's (the checkpoints say so).
    """

    config: TrainConfig
    trainer: Trainer
    workdir: Path | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lr: Callable[[int], float] | None = None
    changed: dict[str, Any] = dataclasses.field(default_factory=dict)
    own_model: bool = False


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no NaN (Python's ``NaN`` is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One line of ``metrics.jsonl``."""
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


class EpochLoop:
    """A run's compiled epoch and evaluation, and the loop over its epochs.

    Args:
        runner: where the models live (a strategy or a sweep's placement).
        program: what ``runner`` compiles (see :class:`Runner`).
        state: the run's state, already in ``runner``'s layout (donated to the first epoch).
        members: one :class:`Member` per model, in the state's model order.
        train: the train split.
        test: the test split, evaluated after every epoch.
        batch_size: the train batch.
        eval_batch_size: the test batch (at most the split).

    Attributes:
        compile_seconds: the time compiling took.
    """

    def __init__(
        self,
        runner: Runner,
        program: Any,
        state: Any,
        members: Sequence[Member],
        train: Dataset,
        test: Dataset,
        *,
        batch_size: int,
        eval_batch_size: int,
        save_every_steps: int | None = None,
        input: str = "memory",
    ):
        self.runner = runner
        self.state = state
        self.members = list(members)
        self.train, self.test = train, test
        self.program, self.batch_size = program, batch_size
        self.steps_per_epoch = -(-len(train) // batch_size)
        self.streaming = input == "stream"
        t0 = time.perf_counter()
        if self.streaming:  # the train split stays on the host and comes to the devices chunk by chunk
            self.train_images = None
            self.stream = Stream(train.images.reshape(len(train), -1), runner.stream_sharding, batch_size)
            self._table = runner.compile_batch_table(program, state, len(train), batch_size)
        else:
            self.train_images = runner.put_data(train.images.reshape(len(train), -1))
        self.test_images = runner.put_data(test.images.reshape(len(test), -1))
        # Steps run in parts of this many between which the loop saves and heeds signals; None:
        # the whole epoch is one compiled scan, as fast as it gets. A streamed epoch is one part
        # unless it saves inside (its chunks are the stream's).
        self.save_inside = bool(save_every_steps) and save_every_steps < self.steps_per_epoch
        self.part_steps = save_every_steps if self.save_inside else (self.steps_per_epoch if self.streaming else None)
        self._parts: dict[int, Callable] = {}
        if self.part_steps is None:
            self.train_epoch = runner.compile_epoch(program, state, self.train_images, batch_size)
        self.evaluate = runner.compile_evaluate(program, state, self.test_images, min(eval_batch_size, len(test)))
        self.compile_seconds = time.perf_counter() - t0

    def _part(self, steps: int, state: Any) -> Callable:
        """The compiled run of ``steps`` steps of an epoch (compiled once per length); streamed:
        of a chunk of ``steps`` steps."""
        if steps not in self._parts:
            t0 = time.perf_counter()
            if self.streaming:
                row_shape = (self.stream.row_bytes,)
                self._parts[steps] = self.runner.compile_stream(
                    self.program, state, len(self.train), self.batch_size, steps, row_shape
                )
            else:
                self._parts[steps] = self.runner.compile_epoch(
                    self.program, state, self.train_images, self.batch_size, steps
                )
            self.compile_seconds += time.perf_counter() - t0
        return self._parts[steps]

    def _compile_parts(self, first: int, state: Any) -> None:
        """Every length of part (streamed: of chunk) the epochs will run, compiled before the first."""
        lengths = set(self.part_lengths(first) + self.part_lengths(0))
        if self.streaming:
            lengths = {k for length in lengths for k in chunk_lengths(length, self.stream.per_chunk)}
        for length in sorted(lengths):
            self._part(length, state)

    def _run_part(
        self, state: Any, at: int, length: int, table: Any, report: Callable
    ) -> tuple[Any, list[dict[str, Any]]]:
        """The epoch's steps ``[at, at + length)``: the state and every model's per-step metrics."""
        if not self.streaming:
            state, metrics = self._part(length, state)(state, self.train_images, np.int32(at))
            metrics = self.runner.host_values(metrics)
            report(at + length, metrics)
            return state, metrics
        # Every chunk length was compiled before the first epoch (_compile_parts).
        state, chunks = self.stream.run(
            state, *table, at, length, self._parts.__getitem__, self.runner.host_values, on_chunk=report
        )
        return state, _joined(chunks)

    def part_lengths(self, first: int) -> list[int]:
        """The parts of an epoch's steps from ``first`` on: up to each multiple of ``part_steps``, then the rest."""
        lengths, at = [], first
        while at < self.steps_per_epoch:
            end = min((at // self.part_steps + 1) * self.part_steps, self.steps_per_epoch)
            lengths.append(end - at)
            at = end
        return lengths

    def run(
        self,
        *,
        start_epoch: int,
        start_step: int,
        epochs: int,
        save_every: int = 1,
        keep: int = 3,
        progress: bool = True,
        desc: str = "",
        callbacks: Sequence[Callable[[list[dict[str, Any]]], None]] = (),
        diverged: dict[int, int] | None = None,
        on_diverged: Callable[[dict[int, int]], None] | None = None,
        saved_in: Path | None = None,
        events: bool = True,
        profile: str | Path | None = None,
        resume_progress: dict[str, Any] | None = None,
    ) -> list[TrainState]:
        """Trains from ``start_epoch`` (at optimizer step ``start_step``) to ``epochs``.

        Each epoch: train, evaluate, one record per model (``metrics.jsonl``, then the
        ``callbacks`` with every model's record), a checkpoint every ``save_every`` epochs and
        after the last (the ``keep`` latest and the best are kept). The first SIGINT or SIGTERM to
        any process ends the epoch, saves and raises :class:`~jaxae.errors.TrainingInterrupted`.
        The figures are the caller's to ask for (:meth:`write_figures`), once its own files are written.

        A loss that stops being finite raises :class:`~jaxae.errors.JaxaeError` (the last good
        checkpoint stays the latest) unless ``on_diverged`` is given: then the model is marked in
        ``diverged`` (index -> epoch), saved no more, ``on_diverged(diverged)`` is called, and the
        others go on.

        ``saved_in``: the folder an interruption's message names (a sweep's); by default the
        checkpoint's own.

        Inside an epoch (a loop made with ``save_every_steps``, one model): the steps run in
        parts that end at every multiple of ``save_every_steps``; after each part the loop saves
        a checkpoint (with the epoch's position and its per-step metrics so far) and heeds a
        signal, so a preemption loses at most that many steps. ``resume_progress`` is such a
        checkpoint's position (:func:`jaxae.checkpoint.read_meta`'s ``"epoch_progress"``): the
        run continues inside ``start_epoch`` and its record is the one an uninterrupted run gives.

        Watching the run: with ``events`` each model's records also go to TensorBoard event files
        in ``<workdir>/events`` (every number of a record, at its step); with ``profile`` the first
        epoch (compiled beforehand, so only running it) is traced with ``jax.profiler`` into that
        folder (``plugins/profile/<time>/*.xplane.pb``, which TensorBoard's profile plugin and
        XProf read). The first record of each call holds ``compile_seconds``; every record holds
        the process's peak host memory and, where the backend reports it, the peak device memory.

        Returns:
            Each model's final state, on the host.
        """
        runner, members = self.runner, self.members
        diverged = diverged if diverged is not None else {}
        sweep = on_diverged is not None
        metrics_files: list[Any] = []
        ckpts: list[Any] = []
        stop = None
        if any(m.workdir is not None for m in members):
            for m in members:
                metrics_file, ck = rundir.open_run_outputs(
                    m.workdir, m.config, m.history, keep, primary=runner.is_primary, own_model=m.own_model
                )
                metrics_files.append(metrics_file)
                ckpts.append(ck)
            stops_at = f"the steps up to the next multiple of {self.part_steps}" if self.save_inside else "this epoch"
            stop = rundir.StopOnSignal(stops_at).__enter__()
        writers = [
            rundir.EventWriter(m.workdir, resumed_at_step=start_step)
            if events and m.workdir is not None and runner.is_primary
            else None
            for m in members
        ]
        bar = tqdm(
            range(start_epoch, epochs),
            initial=start_epoch,
            total=epochs,
            desc=desc,
            unit="epoch",
            disable=not (progress and runner.is_primary),
        )
        state = self.state
        self.state = None  # donated
        first, carried = 0, None
        if resume_progress is not None:
            first, carried = self._check_progress(resume_progress)
            if self.part_steps is None:  # resumed without save_every_steps: the rest of the epoch is one part
                self.part_steps = self.steps_per_epoch
        if self.part_steps is not None:  # compiled before the first epoch: its record holds compile_seconds
            self._compile_parts(first, state)
        step = start_step
        try:
            for epoch in bar:
                if stop is not None and stop.agreed() is not None:
                    break
                tracing = profile is not None and epoch == start_epoch
                with _trace(profile) if tracing else contextlib.nullcontext():
                    t_start = time.perf_counter()
                    if self.part_steps is None:
                        state, step_metrics = self.train_epoch(state, self.train_images)
                        step_metrics = runner.host_values(step_metrics)
                        signum = None
                    else:
                        report = _StepReport(bar, writers, self.steps_per_epoch, first, step - first)
                        state, step_metrics, signum = self._train_parts(state, first, carried, ckpts, stop, report)
                    if signum is not None:  # stopped inside the epoch, saved there
                        at = len(step_metrics[0]["count"])  # the epoch's steps done, those resumed included
                        raise rundir.interrupted(
                            signum,
                            members[0].config,
                            runner.checkpoint_states(state)[0],
                            ckpts[0],
                            elsewhere=stop.from_another_process,
                            epoch_step=(at, self.steps_per_epoch),
                        )
                    trained = self.steps_per_epoch - first
                    first, carried = 0, None
                    t_train = time.perf_counter() - t_start
                    test_metrics = runner.host_values(self.evaluate(state, self.test_images))
                    seconds = time.perf_counter() - t_start  # the epoch's training and evaluation, every model's
                memory = memory_record()
                step += trained
                saving = bool(ckpts) and ((epoch + 1) % save_every == 0 or epoch + 1 == epochs)
                records = []
                for i, m in enumerate(members):
                    train_i = summarize_epoch(step_metrics[i])
                    test_i = {k: float(v) for k, v in test_metrics[i].items()}
                    record = {
                        "epoch": epoch + 1,
                        "step": step,
                        **({"lr": m.lr(step - 1)} if m.lr is not None else {}),
                        **{f"train_{k}": v for k, v in train_i.items()},
                        **{f"test_{k}": v for k, v in test_i.items()},
                        "samples_per_s": len(self.train) * trained / self.steps_per_epoch / t_train,
                        **({"sweep_samples_per_s": len(members) * len(self.train) / t_train} if sweep else {}),
                        "seconds": seconds,
                        **({"compile_seconds": self.compile_seconds} if epoch == start_epoch else {}),
                        **memory,
                    }
                    if m.changed and epoch == start_epoch:
                        record["changed"] = m.changed  # the settings this resumed run changed, from -> to
                    records.append(record)
                    if i in diverged:
                        continue  # its last record is the epoch it diverged at; it is saved no more
                    finite = all(math.isfinite(v) for v in [*train_i.values(), *test_i.values()])
                    if not finite and not sweep:
                        _raise_diverged(epoch + 1, train_i, test_i, ckpts[i] if ckpts else None)
                    if not finite:
                        diverged[i] = epoch + 1  # its later checkpoints are not saved; the others go on
                    elif saving:
                        # The previous save must be complete before this one starts anyway; waiting
                        # here stops a run whose save failed (CheckpointSaveError) before it records more.
                        ckpts[i].wait()
                    m.history.append(record)
                    if metrics_files and metrics_files[i] is not None:
                        metrics_files[i].write(json_line(record))
                        metrics_files[i].flush()
                    if writers[i] is not None:
                        writers[i].write(record)
                    if not finite:
                        on_diverged(diverged)  # a resume keeps it diverged
                if saving:
                    self._save(ckpts, runner.checkpoint_states(state), records, diverged)
                for callback in callbacks:
                    callback(records)
                bar.set_postfix(**_postfix(records, seconds))
            signum = stop.agreed() if stop is not None else None
            if signum is not None:
                first = next((i for i in range(len(members)) if i not in diverged), 0)
                saved = runner.checkpoint_states(state)
                if int(saved[first].epoch) > start_epoch:
                    self._save(ckpts, saved, [m.history[-1] if m.history else {} for m in members], diverged)
                raise rundir.interrupted(
                    signum,
                    members[first].config,
                    saved[first],
                    ckpts[first],
                    saved_in=saved_in,
                    elsewhere=stop.from_another_process,
                )
        finally:
            if stop is not None:
                stop.__exit__()
            for w in writers:
                if w is not None:
                    w.close()
            for f in metrics_files:
                if f is not None:
                    f.close()
            for ck in ckpts:
                ck.close()  # completes the save in flight

        return runner.host_states(state)

    def write_figures(self, states: Sequence[TrainState], diverged: dict[int, int] | None = None) -> None:
        """Each model's ``reconstructions.png`` and ``loss.png`` in its run folder (the primary
        process only; none for a model that diverged: it holds NaN)."""
        if not self.runner.is_primary:
            return
        for i, (m, s) in enumerate(zip(self.members, states, strict=True)):
            if m.workdir is not None and i not in (diverged or {}):
                plots.write_run_figures(m.workdir, m.trainer, s, self.test, m.history)

    def _save(self, ckpts: list, states: list[TrainState], records: list[dict], diverged: dict[int, int]) -> None:
        for i, (ck, m, s, r) in enumerate(zip(ckpts, self.members, states, records, strict=True)):
            if i in diverged or int(s.step) in ck.steps():
                continue  # a diverged model keeps its last good checkpoint; a resumed one may hold this step
            ck.save(s, m.config, metrics={"test_loss": r["test_loss"]})

    def _train_parts(
        self,
        state: Any,
        first: int,
        carried: list | None,
        ckpts: list,
        stop: Any,
        report: Callable[[int, list[dict[str, Any]]], None] = lambda end, metrics: None,
    ) -> tuple[Any, list[dict[str, Any]], int | None]:
        """The epoch from its step ``first`` on, part by part, saving (and heeding a signal) after each.

        Returns the state, every model's per-step metrics of the whole epoch (``carried``: those of
        the steps before ``first``, from the checkpoint resumed) and the signal that stopped it
        inside the epoch (None: it ran to its end). ``report(end_step, metrics)`` gets the steps'
        metrics as they reach the host, part by part (streamed: chunk by chunk).
        """
        parts = [carried] if carried is not None else []
        at, finite = first, True
        # A streamed epoch's permutation, on the host: drawn on the devices from the state, as in memory.
        table = host_table(self._table, state) if self.streaming else None
        for length in self.part_lengths(first):
            state, metrics = self._run_part(state, at, length, table, report)
            parts.append(metrics)
            at += length
            if at == self.steps_per_epoch:
                break
            signum = stop.agreed() if stop is not None else None
            # A loss that stopped being finite is left to the epoch's end, which reports it; its
            # state is never saved. (A resumed epoch's carried metrics were finite when saved.)
            finite = finite and all(
                np.all(np.isfinite(np.asarray(v, np.float64))) for m in parts[-1] for v in m.values()
            )
            if ckpts and finite:
                ckpts[0].wait()  # a failed earlier save stops the run here (CheckpointSaveError)
                saved = self.runner.checkpoint_states(state)[0]
                if int(saved.step) not in ckpts[0].steps():
                    progress = {
                        "epoch_step": at,
                        "steps_per_epoch": self.steps_per_epoch,
                        "train_rows": len(self.train),
                        "train_fingerprint": self.train_fingerprint,
                        "step_metrics": _encode_metrics(_joined(parts)[0]),
                    }
                    ckpts[0].save(saved, self.members[0].config, progress=progress)
            if signum is not None:
                return state, _joined(parts), signum
        return state, _joined(parts), None

    def _check_progress(self, progress: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        """A mid-epoch checkpoint's position, checked against this run: ``(first step, metrics so far)``."""
        if len(self.members) != 1:
            raise JaxaeError("a sweep cannot resume inside an epoch")
        rows, steps = int(progress["train_rows"]), int(progress["steps_per_epoch"])
        if (rows, steps) != (len(self.train), self.steps_per_epoch):
            raise JaxaeError(
                f"the checkpoint stopped at step {progress['epoch_step']} of an epoch of {steps} steps over {rows} "
                f"train images, and this run's epoch is {self.steps_per_epoch} steps over {len(self.train)}: resume "
                "with the dataset and --batch-size it was saved with"
            )
        saved = progress.get("train_fingerprint")  # absent in checkpoints of jaxae before it was recorded
        if saved is not None and saved != self.train_fingerprint:
            raise JaxaeError(
                f"the checkpoint stopped at step {progress['epoch_step']} of an epoch over train images that have "
                f"changed since ({saved}, now {self.train_fingerprint}: the same count, other pixels); the rest of "
                "that epoch would train on other rows than its start. Resume with the train data it was saved with"
            )
        return int(progress["epoch_step"]), [_decode_metrics(progress["step_metrics"])]

    @functools.cached_property
    def train_fingerprint(self) -> str:
        """A checksum of the train split, recorded with a position inside an epoch: CRC-32 of its
        shape and every byte, or past :data:`FINGERPRINT_ALL_BYTES` of 4,096 rows spread over it
        (so a split of any size costs at most a few seconds, once per run)."""
        images = self.train.images
        crc = zlib.crc32(repr(images.shape).encode())
        if isinstance(images, np.ndarray) and images.nbytes <= FINGERPRINT_ALL_BYTES:  # not a split read in place
            step = max(1, (64 << 20) // max(1, images[0].nbytes))
            for start in range(0, len(images), step):
                crc = zlib.crc32(np.ascontiguousarray(images[start : start + step]).tobytes(), crc)
        else:
            for i in np.unique(np.linspace(0, len(images) - 1, 4096).astype(np.int64)):
                crc = zlib.crc32(np.ascontiguousarray(images[i]).tobytes(), crc)
        return f"crc32:{crc:08x}"


#: Train splits up to this size are checksummed whole for a position inside an epoch; larger ones by rows.
FINGERPRINT_ALL_BYTES = 1 << 30
#: Inside an epoch that runs in parts or streams, progress and the event files get the recent
#: train loss about every this many steps (the in-memory epoch is one compiled call: per epoch).
REPORT_STEPS = 200


class _StepReport:
    """Progress inside an epoch: about every :data:`REPORT_STEPS` steps, the bar shows the epoch's
    step and the mean train loss of the steps since the last report, and each model's event file
    gets that loss as ``train_loss_recent`` at its optimizer step."""

    def __init__(self, bar: Any, writers: list, steps_per_epoch: int, first: int, base_step: int):
        self.bar, self.writers, self.steps = bar, writers, steps_per_epoch
        self.reported, self.base = first, base_step  # the global step of the epoch's step 0
        self.losses: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    def __call__(self, end: int, metrics: list[dict[str, Any]]) -> None:
        self.losses.append(np.asarray(metrics[0]["loss"], np.float64))
        self.counts.append(np.asarray(metrics[0]["count"], np.float64))
        if end // REPORT_STEPS == self.reported // REPORT_STEPS or end == self.steps:
            return  # nothing crossed; an epoch's end has its own record
        loss, count = np.concatenate(self.losses), np.concatenate(self.counts)
        recent = float(np.sum(loss * count) / np.sum(count))
        self.losses, self.counts, self.reported = [], [], end
        self.bar.set_postfix(step=f"{end}/{self.steps}", train_loss_recent=f"{recent:.4f}")
        for w in self.writers[:1]:
            if w is not None:
                w.write({"step": self.base + end, "train_loss_recent": recent})


def _joined(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-part lists of every model's per-step metrics -> every model's, for all the parts' steps."""
    return [
        {k: np.concatenate([np.asarray(p[i][k]) for p in parts]) for k in parts[0][i]} for i in range(len(parts[0]))
    ]


def _encode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-step metrics as JSON (each float exactly: float32 -> Python float -> float32 is the identity)."""
    return {
        k: {"dtype": str(np.asarray(v).dtype), "values": json_safe(np.asarray(v).astype(np.float64).tolist())}
        for k, v in metrics.items()
    }


def _decode_metrics(encoded: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        k: np.asarray([np.nan if x is None else x for x in v["values"]], np.float64).astype(v["dtype"])
        for k, v in encoded.items()
    }


def memory_record() -> dict[str, int]:
    """``{"peak_host_bytes": this process's peak resident memory, "peak_device_bytes": the largest
    peak over this process's devices}``, each where the platform reports it (XLA's CPU backend
    reports no device memory: its arrays are in the host's)."""
    out = {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak:
        out["peak_host_bytes"] = int(peak) * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    device_peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some backends do not implement it
            stats = {}
        if "peak_bytes_in_use" in stats:
            device_peaks.append(int(stats["peak_bytes_in_use"]))
    if device_peaks:
        out["peak_device_bytes"] = max(device_peaks)
    return out


@contextlib.contextmanager
def _trace(folder: str | Path):
    """``jax.profiler.trace`` into ``folder``, announced on stderr (where a trace goes is not obvious)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(folder)):
        yield
    print(
        f"jaxae: profiled the first epoch into {folder} (open it with TensorBoard's profile plugin or XProf)",
        file=sys.stderr,
    )


def _postfix(records: list[dict], seconds: float) -> dict[str, str]:
    if len(records) == 1:
        return {"train_loss": f"{records[0]['train_loss']:.4f}", "test_loss": f"{records[0]['test_loss']:.4f}"}
    best = min((r["test_loss"] for r in records if math.isfinite(r["test_loss"])), default=float("nan"))
    return {"best_test_loss": f"{best:.4f}", "models_per_s": f"{len(records) / seconds:.1f}"}


def _raise_diverged(epoch: int, train_metrics: dict[str, float], test_metrics: dict[str, float], ckpts: Any) -> None:
    bad = {f"train {k}": v for k, v in train_metrics.items() if not math.isfinite(v)}
    bad.update({f"test {k}": v for k, v in test_metrics.items() if not math.isfinite(v)})
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
