"""Data-parallel strategies: how a :class:`~jaxae.train.Trainer`'s epoch runs on the devices.

A strategy places the uint8 dataset and the train state on the devices and compiles the
epoch and evaluation functions for them. ``fit()`` only talks to this interface, so a user's
own loop can use any strategy with any variant.

* ``none``: one device, ``jax.jit``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxae.errors import JaxaeError
from jaxae.train import Trainer, TrainState

STRATEGIES = ("none",)


class Strategy:
    """Places data and state and compiles the epoch for one layout of devices.

    Subclasses override the methods; the single-device behaviour is this base class.
    """

    name = "none"

    @property
    def device_count(self) -> int:
        return 1

    def check_batch_size(self, batch_size: int) -> None:
        """Raises :class:`JaxaeError` if the global batch cannot be split over the devices."""
        if batch_size % self.device_count:
            raise JaxaeError(
                f"--batch-size {batch_size} is not divisible by the {self.device_count} devices of "
                f"the {self.name!r} strategy; use a multiple of {self.device_count}"
            )

    def put_data(self, images: Any) -> jax.Array:
        """Host uint8 ``[N, D]`` -> the layout the compiled functions expect."""
        return jax.device_put(images)

    def put_state(self, state: TrainState) -> TrainState:
        """A host (or single-device) state -> the strategy's layout."""
        return jax.device_put(state)

    def host_state(self, state: TrainState) -> TrainState:
        """The strategy's state -> one ordinary copy (for checkpoints, figures, evaluation)."""
        return state

    def compile_epoch(self, trainer: Trainer, state: TrainState, images: jax.Array, batch_size: int) -> Callable:
        """``(state, images) -> (state, per-step metrics)``, compiled ahead of time."""
        self.check_batch_size(batch_size)
        return trainer.jit_train_epoch.lower(state, images, batch_size=batch_size).compile()

    def compile_evaluate(self, trainer: Trainer, state: TrainState, images: jax.Array, batch_size: int) -> Callable:
        """``(state, images) -> metric means``, compiled ahead of time."""
        return trainer.jit_evaluate.lower(state, images, batch_size=batch_size).compile()


def get_strategy(name: str) -> Strategy:
    """A strategy by its CLI name."""
    if name == "none":
        return Strategy()
    raise JaxaeError(f"unknown parallel strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
