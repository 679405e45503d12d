"""Streaming input (``--input stream``): the train split read from the host a few steps ahead of the devices.

The in-memory path (``--input memory``) places the whole train split on the devices and runs
an epoch as one compiled scan that gathers each batch there. The stream keeps the split on
the host (a plain IDX file stays memory-mapped, so its pages are the file's, not the process's)
and runs the epoch in *chunks* of a few steps: for each chunk the host gathers the rows of its
batches, in the epoch's order, and puts them on the devices while the previous chunk trains.

The numbers are those of the in-memory path: the same per-epoch permutation (drawn on the
devices from the state, as there), the same padding and mask of the last batch, the same
per-example random streams (keyed by dataset index), the same train step. Only where the rows
come from differs, so ``--input`` is a memory and speed choice, never a change of results.

The pipeline is a `Grain <https://github.com/google/grain>`_ ``MapDataset`` over the chunks of
a part of an epoch, read by a thread pool with a bounded prefetch buffer (``ReadOptions``):
gathering rows from the file runs in Grain's threads while the devices train, and at most
``prefetch`` gathered chunks wait on the host and ``in_flight`` placed chunks on the devices.
Each process gathers only the columns of the global batch that its own devices train on
(``--parallel shard`` across processes), so no process reads another's rows.

The position in the stream is the epoch's step, which checkpoints already record
(``--save-every-steps``): a resume draws the epoch's permutation again and starts the stream
at that step.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxae.errors import DataError, JaxaeError

INPUTS = ("auto", "memory", "stream")
#: ``--input auto`` streams when the splits placed in memory would take more than this share of
#: the smallest of a device's memory and the host's available memory.
MEMORY_SHARE = 0.5
#: The host memory one chunk of gathered rows may take; chunks are at most ``MAX_CHUNK_STEPS`` steps.
CHUNK_BYTES = 32 << 20
MAX_CHUNK_STEPS = 16


def chunk_steps(batch_size: int, row_bytes: int) -> int:
    """Steps per chunk: as many as fit :data:`CHUNK_BYTES` of rows, 1 to :data:`MAX_CHUNK_STEPS`."""
    return int(max(1, min(MAX_CHUNK_STEPS, CHUNK_BYTES // max(1, batch_size * row_bytes))))


def chunk_lengths(steps: int, per_chunk: int) -> list[int]:
    """``steps`` steps in chunks of ``per_chunk``, the last one shorter."""
    return [per_chunk] * (steps // per_chunk) + ([steps % per_chunk] if steps % per_chunk else [])


class Stream:
    """The train split on the host, served to the devices chunk by chunk.

    Args:
        images: uint8 ``[N, F]`` on the host (a memory-mapped file is read in place).
        sharding: how a chunk ``[steps, B, F]`` (and its ids and mask ``[steps, B]``) lies on the
            devices: one device's, or split along the batch axis over a mesh
            (``NamedSharding(mesh, P(None, "data"))``), each device holding its ``B / D`` columns.
        batch_size: the global batch ``B``.
        per_chunk: steps per chunk (default: :func:`chunk_steps`).
        prefetch: gathered chunks the host holds ahead of the devices.
        in_flight: placed chunks queued on the devices before the host waits for the oldest.
        threads: Grain's reader threads.
    """

    def __init__(
        self,
        images: Any,
        sharding: Any,
        batch_size: int,
        *,
        per_chunk: int | None = None,
        prefetch: int = 2,
        in_flight: int = 2,
        threads: int = 2,
    ):
        self.images, self.sharding, self.batch_size = images, sharding, batch_size
        self.rows, self.row_bytes = int(images.shape[0]), int(np.prod(images.shape[1:]))
        self.per_chunk = per_chunk or chunk_steps(batch_size, self.row_bytes)
        self.prefetch, self.in_flight, self.threads = prefetch, in_flight, threads
        # This process's devices and the columns of the global batch each trains on.
        indices = sharding.addressable_devices_indices_map((1, batch_size))
        self.columns = [(device, index[1]) for device, index in indices.items()]

    def chunks(self, ids: np.ndarray, mask: np.ndarray, first: int, lengths: list[int]) -> Iterator[tuple]:
        """``(first_step, length, rows, ids, mask)`` placed on the devices, chunk after chunk.

        ``ids`` and ``mask`` are the epoch's ``[steps, B]`` table (:meth:`jaxae.train.Trainer.epoch_batches`);
        the chunks cover its steps ``first, first + lengths[0], ...``.
        """
        import grain

        self._check_mapped_file()
        starts = np.concatenate([[first], first + np.cumsum(lengths)[:-1]]).astype(int) if lengths else []
        plan = list(zip(starts, lengths, strict=True))

        def gather(i: int) -> tuple[int, int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
            start, length = plan[i]
            out = []
            for _, cols in self.columns:
                chunk_ids = ids[start : start + length, cols]
                rows = np.asarray(self.images[chunk_ids.reshape(-1)]).reshape(*chunk_ids.shape, self.row_bytes)
                out.append((rows, chunk_ids, mask[start : start + length, cols]))
            return start, length, out

        dataset = grain.MapDataset.range(len(plan)).map(gather)
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        for start, length, parts in dataset.to_iter_dataset(options):
            yield (start, length, *(self._place([p[j] for p in parts], length) for j in range(3)))

    def _check_mapped_file(self) -> None:
        """A mapped train file shortened since it was opened faults (SIGBUS) where a row past its
        new end is read: refused here, before each part of an epoch, with one line instead."""
        import mmap

        x = self.images
        while isinstance(x, np.ndarray) and not isinstance(x, np.memmap):
            x = x.base
        mapped = getattr(x, "_mmap", None) if isinstance(x, np.memmap) else None
        if not isinstance(mapped, mmap.mmap):
            return
        try:
            size = mapped.size()  # the file's size now (fstat of the map's own descriptor)
        except (OSError, ValueError):
            return
        needed = x.offset + x.nbytes
        if size < needed:
            raise DataError(
                f"the train file {getattr(x, 'filename', None) or 'being streamed'} is now {size} bytes, shorter "
                f"than the {needed} it held when the run opened it: it was truncated or rewritten during training. "
                "Replace a dataset file by writing a new one and renaming it over the old (jaxae.write_idx does)"
            )

    def _place(self, per_device: list[np.ndarray], length: int) -> jax.Array:
        shape = (length, self.batch_size, *per_device[0].shape[2:])
        arrays = [jax.device_put(x, device) for (device, _), x in zip(self.columns, per_device, strict=True)]
        return jax.make_array_from_single_device_arrays(shape, self.sharding, arrays)

    def run(
        self,
        state: Any,
        ids: np.ndarray,
        mask: np.ndarray,
        first: int,
        steps: int,
        compiled: Callable[[int], Callable],
        host_values: Callable[[Any], list[Any]],
        on_chunk: Callable[[int, list[Any]], None] | None = None,
    ) -> tuple[Any, list[list[dict[str, Any]]]]:
        """Trains the epoch's steps ``[first, first + steps)`` chunk by chunk.

        ``compiled(length)`` is the compiled ``(state, rows, ids, mask, first) -> (state, metrics)``
        of a chunk of that many steps. Returns the state and the chunks' metrics as
        ``host_values`` gives them, in order; ``on_chunk(end_step, metrics)`` gets each chunk's
        as it reaches the host (progress inside an epoch).
        """
        pending: collections.deque = collections.deque()
        done = []

        def finish() -> None:
            end, metrics = pending.popleft()
            done.append(host_values(metrics))
            if on_chunk is not None:
                on_chunk(end, done[-1])

        for start, length, rows, chunk_ids, chunk_mask in self.chunks(
            ids, mask, first, chunk_lengths(steps, self.per_chunk)
        ):
            state, metrics = compiled(length)(state, rows, chunk_ids, chunk_mask, start)
            pending.append((start + length, metrics))
            if len(pending) > self.in_flight:  # back-pressure: the devices' queue stays bounded
                finish()
        while pending:
            finish()
        return state, done


def host_table(fn: Callable, state: Any) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's ``(ids, mask)`` ``[steps, B]`` drawn by ``fn(state)`` on the devices, on the host
    (this process's copy of a replicated global array in a multi-process run)."""
    ids, mask = fn(state)
    return np.asarray(ids.addressable_data(0)), np.asarray(mask.addressable_data(0))


def choose_input(requested: str, placed_bytes: int, devices: list, *, streams: bool = True) -> tuple[str, str]:
    """``(choice, why)``: ``requested``, or for ``auto`` memory where the splits fit the memory they
    would live in: a GPU's or TPU's ``bytes_limit``; on CPU devices the host's available memory
    (cgroup limits included), which this process's CPU devices share. ``placed_bytes`` is what one
    device holds of the splits; memory up to :data:`MEMORY_SHARE` of the budget.

    Raises:
        JaxaeError: an unknown input.
    """
    if requested not in INPUTS:
        raise JaxaeError(f"--input must be one of {', '.join(INPUTS)}, got {requested!r}")
    if requested != "auto":
        return requested, f"--input {requested}"
    if not streams:
        return "memory", "--input auto chose memory: this strategy does not stream"
    platform = devices[0].platform
    if platform == "cpu":
        need, budget, name = placed_bytes * len(devices), _host_available(), "host memory available"
        held = "per device" if len(devices) == 1 else f"on this process's {len(devices)} CPU devices"
    else:
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices if _has_memory_stats(d)]
        budget = min(limits) if limits and all(limits) else None
        need, name, held = placed_bytes, f"{platform} device memory", "per device"
    if not budget:
        return "memory", "--input auto chose memory: no memory budget is known here"
    share = need / budget
    choice = "memory" if share <= MEMORY_SHARE else "stream"
    return choice, (
        f"--input auto chose {choice}: the splits take {_size(need)} {held}, "
        f"{share:.0%} of the {_size(budget)} of {name} (memory up to {MEMORY_SHARE:.0%})"
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.0f} MiB"


def _has_memory_stats(device: Any) -> bool:
    try:
        return bool(device.memory_stats())
    except Exception:  # some backends do not implement it
        return False


def _host_available() -> int | None:
    """The memory this process may still take: MemAvailable of ``/proc/meminfo``, lowered to what
    its cgroup (a container's limit, v2 or v1) leaves; else the physical memory; None if unknown."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit) as f, open(usage) as g:
                left = int(f.read().strip()) - int(g.read().strip())  # "max" (no limit) is no int
        except (OSError, ValueError):
            continue
        if 0 <= left < available:
            available = left
        break
    return available
