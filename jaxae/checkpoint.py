"""Orbax checkpoints of a whole :class:`~jaxae.train.TrainState` plus the run's config.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}`` where ``state`` is the pytree (params,
optimizer state, step, epoch, rng keys) and ``meta`` is JSON (the config and the input size),
enough to rebuild the model structure before restoring into it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxae.errors import JaxaeError
from jaxae.train import TrainConfig, Trainer, TrainState, build

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / CHECKPOINT_DIR


def manager(workdir: str | Path, *, max_to_keep: int | None = 3, create: bool = True) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` over ``WORKDIR/checkpoints``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def input_dim_of(state: TrainState) -> int:
    """The flattened input size, read off the first layer's kernel."""
    kernel = state.params["encoder"]["layers"][0]["kernel"]
    return int(math.prod(kernel.shape[:-1]))


def save(
    workdir: str | Path, state: TrainState, config: TrainConfig, *, mngr: ocp.CheckpointManager | None = None
) -> int:
    """Saves ``state`` and ``config`` under ``WORKDIR/checkpoints/<step>``; returns the step."""
    own = mngr is None
    mngr = mngr or manager(workdir)
    step = int(jax.device_get(state.step))
    meta = {"config": config.to_dict(), "input_dim": input_dim_of(state)}
    mngr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
    )
    mngr.wait_until_finished()
    if own:
        mngr.close()
    return step


def read_meta(workdir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """The step and JSON metadata of a checkpoint (the latest when ``step`` is None)."""
    root = checkpoint_dir(workdir)
    if not root.is_dir():
        raise JaxaeError(
            f"no checkpoints in {workdir} (expected a folder {root}); train with --workdir {workdir} first"
        )
    mngr = manager(workdir, create=False)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise JaxaeError(f"no complete checkpoint in {root}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise JaxaeError(f"no checkpoint at step {step} in {root}; saved steps: {sorted(steps)}")
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        mngr.close()
    return step, meta


def restore(workdir: str | Path, step: int | None = None) -> tuple[Trainer, TrainState, TrainConfig]:
    """Rebuilds the model from the checkpoint's config and restores its state into it."""
    step, meta = read_meta(workdir, step)
    config = TrainConfig.from_dict(meta["config"])
    trainer, fresh = build(config, int(meta["input_dim"]))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
    mngr = manager(workdir, create=False)
    try:
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    finally:
        mngr.close()
    return trainer, state, config
