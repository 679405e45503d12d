"""Data-parallel strategies: how a :class:`~jaxae.train.Trainer`'s epoch runs on the devices.

A strategy places the uint8 dataset and the train state on the devices and compiles the
epoch and evaluation functions for them. ``fit()`` only talks to this interface, so a user's
own loop can use any strategy with any variant::

    from jaxae.parallel import get_strategy

    strategy = get_strategy("shard")                # or "pmap", "none", "auto"
    state = strategy.put_state(state)
    images = strategy.put_data(train_images)        # uint8 [N, D], the whole split
    train_epoch = strategy.compile_epoch(trainer, state, images, batch_size=256)
    for epoch in range(20):
        state, step_metrics = train_epoch(state, images)
    final = strategy.host_state(state)              # one ordinary copy

* ``none``: one device, ``jax.jit``.
* ``pmap``: ``jax.pmap`` over this process's devices with the named axis ``batch``; the state
  carries a leading device axis.
* ``shard``: ``jax.jit`` over a ``jax.make_mesh`` of every device of every process, axis
  ``data``; the state is replicated (``NamedSharding(mesh, P())``) and the dataset is held
  once across the devices: device ``d`` of ``D`` holds rows ``[d R, (d + 1) R)`` of the split
  (``R = ceil(N / D)``, the last block padded), :class:`RowShards`. Each step every device
  reads the rows of the global batch it holds, and a ``lax.psum_scatter`` over ``data`` hands
  each device its own ``B / D`` rows; evaluation sums each device's block and adds the sums.

Under ``pmap`` the whole split sits on every device (MNIST is 47 MB): it is the strategy of
one process and small data; ``shard`` is the one for data that should not be copied ``D``
times. In both, every device draws the epoch's global permutation and trains on its own
``B / devices`` rows of every batch, and :meth:`Trainer.train_step <jaxae.train.Trainer.train_step>`
sums the loss and gradients over the devices (``lax.psum``) and divides by the global row
count. Per-example randomness is keyed by the example's dataset index, so the same seed and
global batch give the same losses and parameters on 1 device, ``N`` devices or ``N`` processes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxae.errors import JaxaeError
from jaxae.train import Trainer, TrainState

STRATEGIES = ("auto", "none", "pmap", "shard")

PMAP_AXIS = "batch"
MESH_AXIS = "data"

SHARED_MARKER = ".jaxae-shared-check"
DEFAULT_COORDINATOR_TIMEOUT = 60


class Strategy:
    """Places data and state and compiles the epoch for one layout of devices.

    Subclasses override the methods; the single-device behaviour is this base class.
    """

    name = "none"
    #: Whether ``--input stream`` (:mod:`jaxae.stream`) can feed it.
    streams = True

    @property
    def device_count(self) -> int:
        """How many devices share each global batch."""
        return 1

    def placed_bytes(self, nbytes: int) -> int:
        """What a split of ``nbytes`` takes on each device once :meth:`put_data` placed it."""
        return nbytes

    @property
    def is_primary(self) -> bool:
        """True in the one process that writes metrics, figures and prints (process 0)."""
        return jax.process_index() == 0

    def check_batch_size(self, batch_size: int) -> None:
        """Raises :class:`JaxaeError` if the global batch cannot be split over the devices."""
        if batch_size % self.device_count:
            raise JaxaeError(
                f"--batch-size {batch_size} is not divisible by the {self.device_count} devices of "
                f"the {self.name!r} strategy; use a multiple of {self.device_count}"
            )

    def put_data(self, images: Any) -> jax.Array:
        """Host uint8 ``[N, D]`` -> the layout the compiled functions expect (see :func:`put_dataset`)."""
        return put_dataset(images)

    def put_state(self, state: TrainState) -> TrainState:
        """A host (or single-device) state -> the strategy's layout."""
        return jax.device_put(state)

    def host_state(self, state: TrainState) -> TrainState:
        """The strategy's state -> one ordinary copy on this process (for figures, evaluation)."""
        return state

    def checkpoint_state(self, state: TrainState) -> TrainState:
        """The state as :func:`jaxae.checkpoint.save` should get it.

        In a multi-process run these are global arrays and every process must call ``save``
        (Orbax coordinates them and the primary process writes).
        """
        return self.host_state(state)

    def host_values(self, tree: Any) -> list[Any]:
        """A compiled function's outputs -> ``[host copy]`` (one model; see :class:`jaxae.epochs.Runner`)."""
        return [jax.device_get(tree)]

    def host_states(self, state: TrainState) -> list[TrainState]:
        return [self.host_state(state)]

    def checkpoint_states(self, state: TrainState) -> list[TrainState]:
        return [self.checkpoint_state(state)]

    def compile_epoch(
        self, trainer: Trainer, state: TrainState, images: jax.Array, batch_size: int, steps: int | None = None
    ) -> Callable:
        """``(state, images) -> (state, per-step metrics)``, compiled ahead of time.

        With ``steps``: ``(state, images, first) -> ...`` running only the epoch's steps
        ``[first, first + steps)`` (``first`` an int32 scalar), for checkpoints inside an epoch.
        """
        self.check_batch_size(batch_size)
        if steps is None:
            return trainer.jit_train_epoch.lower(state, images, batch_size=batch_size).compile()

        def part(state, images, first):
            return trainer.train_epoch(state, images, batch_size, first, steps)

        return jax.jit(part, donate_argnums=0).lower(state, images, np.int32(0)).compile()

    def compile_evaluate(self, trainer: Trainer, state: TrainState, images: jax.Array, batch_size: int) -> Callable:
        """``(state, images) -> metric means``, compiled ahead of time."""
        return trainer.jit_evaluate.lower(state, images, batch_size=batch_size).compile()

    # -- streamed input (jaxae.stream): the epoch's rows arrive chunk by chunk from the host

    @property
    def stream_sharding(self) -> Any:
        """Where a streamed chunk ``[steps, B, ...]`` lies: on the one device."""
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def compile_batch_table(self, trainer: Trainer, state: TrainState, rows: int, batch_size: int) -> Callable:
        """``state -> (ids, mask)``: the epoch's ``[steps, B]`` table, drawn where the state lies."""
        return jax.jit(lambda state: trainer.epoch_batches(state, rows, batch_size)).lower(state).compile()

    def compile_stream(
        self, trainer: Trainer, state: TrainState, rows: int, batch_size: int, steps: int, row_shape: tuple[int, ...]
    ) -> Callable:
        """``(state, rows, ids, mask, first) -> (state, per-step metrics)`` for a chunk of ``steps``
        steps starting at the epoch's step ``first`` (an int), compiled ahead of time."""
        self.check_batch_size(batch_size)
        shapes = self._stream_shapes(steps, batch_size, row_shape)

        def chunk(state, x, ids, mask, first):
            after = trainer.epoch_after(state, rows, batch_size, first, steps)
            return trainer.train_batches(state, x, ids, mask, epoch=after)

        compiled = jax.jit(chunk, donate_argnums=0).lower(state, *shapes, np.int32(0)).compile()
        return lambda state, x, ids, mask, first: compiled(state, x, ids, mask, np.int32(first))

    def _stream_shapes(self, steps: int, batch_size: int, row_shape: tuple[int, ...]) -> list[jax.ShapeDtypeStruct]:
        s = self.stream_sharding
        return [
            jax.ShapeDtypeStruct((steps, batch_size, *row_shape), np.uint8, sharding=s),
            jax.ShapeDtypeStruct((steps, batch_size), np.int32, sharding=s),
            jax.ShapeDtypeStruct((steps, batch_size), np.float32, sharding=s),
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(devices={self.device_count})"


def _device_columns(ids: jax.Array, mask: jax.Array, index: jax.Array, per_device: int):
    """Device ``index``'s contiguous columns of the epoch's ``[steps, B]`` ids and mask."""
    start = index * per_device
    return (
        jax.lax.dynamic_slice_in_dim(ids, start, per_device, axis=1),
        jax.lax.dynamic_slice_in_dim(mask, start, per_device, axis=1),
    )


class PmapStrategy(Strategy):
    """``jax.pmap`` over this process's devices, gradients averaged with ``lax.psum``.

    The state carries a leading device axis ``[devices, ...]``, placed by broadcasting to
    that shape and ``jax.device_put`` with the sharding ``pmap`` uses (no
    ``device_put_replicated``); the dataset is an unmapped (``in_axes=None``) argument,
    replicated once on every device.

    Args:
        devices: the devices to map over (default: ``jax.local_devices()``).
    """

    name = "pmap"
    streams = False

    def __init__(self, devices: list | None = None):
        if jax.process_count() > 1:
            raise JaxaeError("the 'pmap' strategy runs in one process; use --parallel shard for a multi-process run")
        self.devices = list(devices or jax.local_devices())
        # The same mesh pmap builds internally, so placed arrays are used without a copy.
        self.mesh = Mesh(np.array(self.devices), (PMAP_AXIS,))

    @property
    def device_count(self) -> int:
        return len(self.devices)

    def put_data(self, images: Any) -> jax.Array:
        return put_dataset(images, NamedSharding(self.mesh, P()))

    def put_state(self, state: TrainState) -> TrainState:
        stacked = NamedSharding(self.mesh, P(PMAP_AXIS))

        def replicate(x):
            x = np.asarray(x)
            # A broadcast view: device_put copies only each device's [1, ...] slice.
            return jax.device_put(np.broadcast_to(x[None], (self.device_count, *x.shape)), stacked)

        return jax.tree.map(replicate, state)

    def host_state(self, state: TrainState) -> TrainState:
        return jax.tree.map(lambda x: x.addressable_data(0)[0], state)

    def compile_epoch(
        self, trainer: Trainer, state: TrainState, images: jax.Array, batch_size: int, steps: int | None = None
    ) -> Callable:
        self.check_batch_size(batch_size)
        per_device = batch_size // self.device_count
        n = images.shape[0]

        def epoch(state, images, first=0):
            ids, mask = trainer.epoch_batches(state, n, batch_size, first, steps)
            ids, mask = _device_columns(ids, mask, jax.lax.axis_index(PMAP_AXIS), per_device)
            after = trainer.epoch_after(state, n, batch_size, first, steps)
            return trainer.train_epoch_shard(state, images, ids, mask, axis_name=PMAP_AXIS, epoch=after)

        # Metrics are psum-ed, hence equal on every device: returned once (out_axes=None).
        if steps is None:
            pmapped = jax.pmap(
                epoch, PMAP_AXIS, in_axes=(0, None), out_axes=(0, None), devices=self.devices, donate_argnums=0
            )
            return pmapped.lower(state, images).compile()
        pmapped = jax.pmap(
            epoch, PMAP_AXIS, in_axes=(0, None, None), out_axes=(0, None), devices=self.devices, donate_argnums=0
        )
        return pmapped.lower(state, images, np.int32(0)).compile()

    def compile_stream(self, *args: Any, **kwargs: Any) -> Callable:
        raise JaxaeError(
            "--input stream runs with --parallel none or shard, not pmap (which holds the data per device)"
        )

    def compile_evaluate(self, trainer: Trainer, state: TrainState, images: jax.Array, batch_size: int) -> Callable:
        pmapped = jax.pmap(
            functools.partial(trainer.evaluate, batch_size=batch_size),
            PMAP_AXIS,
            in_axes=(0, None),
            out_axes=None,
            devices=self.devices,
        )
        return pmapped.lower(state, images).compile()


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["rows"])
@dataclasses.dataclass(frozen=True)
class RowShards:
    """A split held once across a mesh's ``data`` axis: what :meth:`ShardStrategy.put_data` returns.

    Device ``d`` of ``D`` holds rows ``[d R, (d + 1) R)`` of the split, ``R = ceil(rows / D)``;
    the rows past the split's end (at most ``D - 1``) are zero padding that no batch reads
    and that evaluation, which runs over whole blocks, leaves out of its sums. A pytree: the
    compiled epoch and evaluation take it as they take an array.

    Attributes:
        data: uint8 ``[D R, F]``, sharded ``P("data")``.
        rows: the split's row count ``N``.
    """

    data: jax.Array
    rows: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The split's shape ``(N, F)``, padding left out."""
        return (self.rows, *self.data.shape[1:])

    @property
    def block_rows(self) -> int:
        """``R``: the rows each device holds."""
        return self.data.shape[0] // self.data.sharding.num_devices


class ShardStrategy(Strategy):
    """``jax.jit`` over a device mesh spanning every process: replicated state, the data held once.

    The dataset is split into one block of rows per device (:class:`RowShards`), so ``D``
    devices hold one copy between them, not ``D``. Works multi-process after
    :func:`initialize_distributed`: the mesh then holds every process's devices and each
    process reads only the rows its own devices hold (an IDX file is memory-mapped, so the
    rows of other processes' blocks are never read from it).

    Args:
        devices: the mesh's devices (default: ``jax.devices()``, every process's).
    """

    name = "shard"

    def __init__(self, devices: list | None = None):
        devices = list(devices or jax.devices())
        self.mesh = jax.make_mesh(
            (len(devices),), (MESH_AXIS,), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices
        )
        self.replicated = NamedSharding(self.mesh, P())
        self.row_sharded = NamedSharding(self.mesh, P(MESH_AXIS))

    @property
    def device_count(self) -> int:
        return self.mesh.size

    def _replicate(self, x: Any) -> jax.Array:
        x = np.asarray(x)
        # make_array_from_callback only asks for this process's devices: multi-process safe.
        return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

    def put_data(self, images: Any) -> RowShards:
        """Host uint8 ``[N, F]`` -> :class:`RowShards`: each device gets its block of rows.

        Only the blocks of this process's devices are read from ``images``, one at a time, so
        a memory-mapped split is read in part and never copied whole. Each block is copied
        from ``images`` before this returns, as :func:`put_dataset` does. A :class:`RowShards`
        of this strategy's mesh is returned as it is.

        Raises:
            JaxaeError: a :class:`RowShards` placed on another mesh (its blocks would be read
                with another row count per device).
        """
        if isinstance(images, RowShards):
            if images.data.sharding != self.row_sharded:
                raise JaxaeError(
                    f"these RowShards were placed on a mesh of {images.data.sharding.num_devices} devices "
                    f"({images.data.sharding}), not this strategy's {self.device_count}; place the host "
                    "array with this strategy's put_data"
                )
            return images
        n = int(images.shape[0])
        block = -(-n // self.device_count)
        shape = (block * self.device_count, *images.shape[1:])

        def rows(index: tuple[slice, ...]) -> np.ndarray:
            # A block copied into memory of its own (never an alias of a mapped file), aligned so
            # that a CPU device takes it as it is instead of copying it again, the rows past the
            # split's end zero.
            start, stop, _ = index[0].indices(shape[0])
            block = _aligned_empty((stop - start, *shape[1:]), images.dtype)
            real = max(0, min(stop, n) - start)
            block[:real] = images[start : start + real]
            block[real:] = 0
            return block

        return RowShards(jax.block_until_ready(jax.make_array_from_callback(shape, self.row_sharded, rows)), n)

    def _placed(self, images: Any, method: str) -> RowShards:
        if not isinstance(images, RowShards):
            raise JaxaeError(
                f"ShardStrategy.{method} takes the RowShards that put_data returns, got {type(images).__name__}; "
                "place the split first: images = strategy.put_data(images)"
            )
        return self.put_data(images)

    def put_state(self, state: TrainState) -> TrainState:
        return jax.tree.map(self._replicate, state)

    def host_state(self, state: TrainState) -> TrainState:
        # Every device holds the whole replicated state; take this process's first copy.
        return jax.tree.map(lambda x: x.addressable_data(0), state)

    def checkpoint_state(self, state: TrainState) -> TrainState:
        return state if jax.process_count() > 1 else self.host_state(state)

    def compile_epoch(
        self, trainer: Trainer, state: TrainState, images: RowShards, batch_size: int, steps: int | None = None
    ) -> Callable:
        self.check_batch_size(batch_size)
        images = self._placed(images, "compile_epoch")
        n, block, per_device = images.rows, images.block_rows, batch_size // self.device_count

        def device_epoch(state, local, ids, mask, after):
            index = jax.lax.axis_index(MESH_AXIS)

            def body(state, xs):
                ids_b, mask_b = xs  # the global batch [B], the same on every device
                # The batch's rows this device holds, zeros elsewhere; summed and scattered
                # over the devices, each gets its own B / D rows (exactly: one term is not 0).
                at = ids_b - index * block
                held = (at >= 0) & (at < block)
                rows = jnp.where(held[:, None], local[jnp.clip(at, 0, block - 1)], jnp.zeros((), local.dtype))
                x = jax.lax.psum_scatter(rows, MESH_AXIS, scatter_dimension=0, tiled=True)
                own_ids, own_mask = _device_columns(ids_b[None], mask_b[None], index, per_device)
                return trainer.train_step(state, x, own_mask[0], own_ids[0], axis_name=MESH_AXIS)

            state, metrics = jax.lax.scan(body, state, (ids, mask))
            return state.replace(epoch=after), metrics

        # check_vma=False: train_step's explicit psum is the gradient all-reduce, as under
        # pmap; with vma checking, autodiff would insert a second one.
        sharded_epoch = jax.shard_map(
            device_epoch,
            mesh=self.mesh,
            in_specs=(P(), P(MESH_AXIS), P(), P(), P()),
            out_specs=(P(), P()),
            check_vma=False,
        )

        def epoch(state, images, first=0):
            ids, mask = trainer.epoch_batches(state, n, batch_size, first, steps)
            after = trainer.epoch_after(state, n, batch_size, first, steps)
            return sharded_epoch(state, images.data, ids, mask, after)

        jitted = jax.jit(epoch, out_shardings=(self.replicated, self.replicated), donate_argnums=0)
        if steps is None:
            return jitted.lower(state, images).compile()
        compiled = jitted.lower(state, images, self._replicate(np.int32(0))).compile()
        # A global (replicated) scalar: every process passes the same step.
        return lambda state, images, first: compiled(state, images, self._replicate(np.int32(first)))

    def placed_bytes(self, nbytes: int) -> int:
        return -(-nbytes // self.device_count)

    @property
    def stream_sharding(self) -> Any:
        """A streamed chunk ``[steps, B, ...]`` split along the batch: each device holds its ``B / D`` columns."""
        return NamedSharding(self.mesh, P(None, MESH_AXIS))

    def compile_batch_table(self, trainer: Trainer, state: TrainState, rows: int, batch_size: int) -> Callable:
        jitted = jax.jit(lambda state: trainer.epoch_batches(state, rows, batch_size), out_shardings=self.replicated)
        return jitted.lower(state).compile()

    def compile_stream(
        self, trainer: Trainer, state: TrainState, rows: int, batch_size: int, steps: int, row_shape: tuple[int, ...]
    ) -> Callable:
        self.check_batch_size(batch_size)
        shapes = self._stream_shapes(steps, batch_size, row_shape)

        def device_chunk(state, x, ids, mask, after):
            return trainer.train_batches(state, x, ids, mask, axis_name=MESH_AXIS, epoch=after)

        columns = P(None, MESH_AXIS)
        sharded = jax.shard_map(  # check_vma=False: as in compile_epoch, train_step's psum is the all-reduce
            device_chunk,
            mesh=self.mesh,
            in_specs=(P(), columns, columns, columns, P()),
            out_specs=(P(), P()),
            check_vma=False,
        )

        def chunk(state, x, ids, mask, first):
            return sharded(state, x, ids, mask, trainer.epoch_after(state, rows, batch_size, first, steps))

        jitted = jax.jit(chunk, out_shardings=(self.replicated, self.replicated), donate_argnums=0)
        compiled = jitted.lower(state, *shapes, self._replicate(np.int32(0))).compile()
        return lambda state, x, ids, mask, first: compiled(state, x, ids, mask, self._replicate(np.int32(first)))

    def compile_evaluate(self, trainer: Trainer, state: TrainState, images: RowShards, batch_size: int) -> Callable:
        images = self._placed(images, "compile_evaluate")
        n, block = images.rows, images.block_rows

        def device_evaluate(state, local):
            first = jax.lax.axis_index(MESH_AXIS) * block
            return trainer.evaluate(state, local, batch_size, first_id=first, rows=n, axis_name=MESH_AXIS)

        sharded = jax.shard_map(
            device_evaluate, mesh=self.mesh, in_specs=(P(), P(MESH_AXIS)), out_specs=P(), check_vma=False
        )
        jitted = jax.jit(lambda state, images: sharded(state, images.data), out_shardings=self.replicated)
        return jitted.lower(state, images).compile()


def put_dataset(images: Any, sharding: Any = None) -> jax.Array:
    """A host split on the devices as a copy they own, complete when this returns.

    On a CPU backend ``jax.device_put`` aliases a 64-byte aligned host array instead of
    copying it (whatever ``may_alias`` says), and a memory-mapped file can be aligned so:
    a ``.npy`` opened with ``mmap_mode``, or a block of rows of an IDX file. The file's later
    changes would then change what trains, and its truncation would fault inside a step. So a
    file-backed array bound for CPU devices is first copied into memory of this process
    (aligned, so that the devices alias that copy and it is the only one), and the transfer is
    waited for, so the host array is not read again once this returns. Every path that puts a
    dataset on devices comes through here.
    """
    if _file_backed(images) and _platform(sharding) == "cpu":
        images = _aligned_copy(images)
    return jax.block_until_ready(jax.device_put(images, sharding))


def _file_backed(x: Any) -> bool:
    """Whether the numpy array ``x`` views memory numpy does not own: a mapped file
    (``np.memmap``, ``mmap.mmap``, also behind ``np.frombuffer``'s ``memoryview``) or another
    foreign buffer. Such memory can change under a run, so :func:`put_dataset` copies it."""
    import mmap

    if not isinstance(x, np.ndarray):
        return False
    for _ in range(64):  # a chain of views ends at the owner
        if isinstance(x, (np.memmap, mmap.mmap)):
            return True
        if isinstance(x, np.ndarray):
            x = x.base
        elif isinstance(x, memoryview):
            x = x.obj
        else:
            return x is not None  # bytes, another library's buffer: copied, to be safe
        if x is None:
            return False
    return True


def _platform(sharding: Any) -> str:
    devices = jax.devices()[:1] if sharding is None else list(sharding.device_set)
    return devices[0].platform


def _aligned_copy(x: np.ndarray) -> np.ndarray:
    """``x`` copied into a new 64-byte aligned buffer: one the CPU backend aliases, not copies again."""
    out = _aligned_empty(x.shape, x.dtype)
    out[...] = x
    return out


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def get_strategy(name: str, devices: list | None = None) -> Strategy:
    """A strategy by its CLI name.

    Args:
        name: ``"none"``, ``"pmap"``, ``"shard"``, or ``"auto"`` (``shard`` when more than one
            device is visible, else ``none``).
        devices: restrict ``pmap`` / ``shard`` to these devices (default: all visible).
    """
    if name == "auto":
        name = "shard" if len(devices or jax.devices()) > 1 else "none"
    if name == "none":
        if jax.process_count() > 1:
            raise JaxaeError("the 'none' strategy runs in one process; use --parallel shard for a multi-process run")
        return Strategy()
    if name == "pmap":
        return PmapStrategy(devices)
    if name == "shard":
        return ShardStrategy(devices)
    raise JaxaeError(f"unknown parallel strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: float = DEFAULT_COORDINATOR_TIMEOUT,
) -> None:
    """Joins a multi-process run through ``jax.distributed.initialize``.

    Call it before anything touches a device. Arguments left as ``None`` come from the
    environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, else
    JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes). CPU processes
    exchange gradients through Gloo.

    Args:
        coordinator: ``HOST:PORT`` of process 0.
        num_processes: how many processes the run has.
        process_id: this process's index.
        timeout: seconds to wait for every process to reach the coordinator (JAX's own
            default is 300).

    Raises:
        JaxaeError: settings JAX rejects (e.g. a process id not below the process count), or
            the coordinator not reached within ``timeout``.
    """
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes is not None and num_processes <= 0:
        raise JaxaeError(f"--num-processes must be positive, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise JaxaeError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    if coordinator is not None and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise JaxaeError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if not timeout >= 1:
        raise JaxaeError(f"--coordinator-timeout must be at least 1 second, got {timeout}")
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator is not None and process_id not in (None, 0):
        _wait_for_coordinator(coordinator, timeout)
    # Gloo is already JAX's CPU default in recent releases; older ones default to no
    # cross-process CPU collectives at all.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        # JAX takes whole seconds.
        jax.distributed.initialize(
            coordinator, num_processes, process_id, initialization_timeout=max(1, round(timeout))
        )
    except (ValueError, TypeError, RuntimeError) as e:
        # RuntimeError: e.g. devices already in use.
        message = " ".join(str(e).split())
        raise JaxaeError(f"cannot join the multi-process run: {message[:500]}") from None


def _wait_for_coordinator(coordinator: str, timeout: float) -> None:
    """Waits until ``HOST:PORT`` accepts a TCP connection (process 0 may start later).

    JAX's own wait cannot be turned into an error: when its registration times out, the C++
    runtime aborts the process with a stack trace. So the one failure a user can fix, a
    coordinator that is not there, is found here first.
    """
    host, port = coordinator.rsplit(":", 1)
    host = host.strip("[]")  # an IPv6 address in brackets
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            reason = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise JaxaeError(
                f"cannot reach the coordinator {coordinator} within {timeout:g} s ({reason}); check that process 0 "
                "is running with the same --coordinator and that this host can reach it, or raise --coordinator-timeout"
            )
        time.sleep(0.25)


def _share_text(text: str, size: int = 1024) -> list[str]:
    """Every process's ``text`` (at most ``size`` UTF-8 bytes), by process index: a collective."""
    from jax.experimental import multihost_utils

    data = text.encode()[:size]
    buffer = np.zeros(size, np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, size)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in everyone]


def check_shared_workdir(workdir: str | Path, problem: str | None = None) -> None:
    """Checks that every process of a multi-process run sees the same ``workdir``.

    Orbax's multi-process save waits forever when the processes write to different folders
    (e.g. each host's local disk). Process 0 writes a marker holding a random token; after a
    collective (a barrier) every process reads it back, and a second collective tells every
    process who saw it. Every process calls this, and every process raises the same error.

    Args:
        workdir: the run's folder, already created.
        problem: this process's own problem with the workdir, if any (e.g. locked by another
            run); raised in every process, so none is left waiting in a later collective.

    Raises:
        JaxaeError: some process has a problem with the workdir, or does not see process 0's marker.
    """
    workdir = Path(workdir)
    marker = workdir / SHARED_MARKER
    token = ""
    if jax.process_index() == 0 and problem is None:
        token = secrets.token_hex(16)
        try:
            marker.write_text(token)
        except OSError as e:
            problem = f"cannot write {marker}: {e.strerror or e}"
    problems = _share_text(problem or "")
    for index, text in enumerate(problems):
        if text:
            raise JaxaeError(text if index == jax.process_index() else f"process {index}: {text}")
    token = _share_text(token)[0]
    try:
        seen = marker.read_text()
    except OSError:
        seen = ""
    views = _share_text(seen)
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    blind = [i for i, view in enumerate(views) if view != token]
    if blind:
        raise JaxaeError(
            f"--workdir {workdir} is not the same folder for every process ("
            f"{'process ' if len(blind) == 1 else 'processes '}{', '.join(map(str, blind))} "
            f"{'does' if len(blind) == 1 else 'do'} not see what process 0 writes there); --workdir must be "
            "storage every process sees (a shared file system or a mounted bucket)"
        )
