"""One loss per autoencoder variant, the metrics it reports, and the variant registry.

An :class:`Objective` works per example: ``loss(model, x, keys)`` returns the loss of each
example ``[B]`` and a dict of per-example metrics, so the train step can mask padded rows
and reduce across devices with plain sums (the same numbers on 1 or many devices). ``keys``
holds one PRNG key per example, derived from the example's index in the dataset and the
step, so any randomness (noise, reparameterisation) is the same however the batch is split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxae import models
from jaxae.data import Normalization
from jaxae.errors import JaxaeError

PerExample = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a variant optimises and reports.

    Attributes:
        name: the variant's name.
        loss: ``(model, x, keys) -> (loss [B], metrics {name: [B]})`` for training.
        evaluate: ``(model, x, keys) -> {name: [B]}`` for the test split; must hold ``"loss"``.
    """

    name: str
    loss: Callable[[nnx.Module, jax.Array, jax.Array], tuple[jax.Array, PerExample]]
    evaluate: Callable[[nnx.Module, jax.Array, jax.Array], PerExample]


def reconstruction_mse(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example mean squared error over features: ``[B, D] -> [B]``.

    Averaged over a batch this is exactly ``torch.nn.MSELoss()`` (mean over all elements).
    """
    return jnp.mean(jnp.square(reconstruction - target), axis=-1)


def vanilla_objective(config: Any, normalization: Normalization) -> Objective:
    """The document's objective: MSE between the input and its reconstruction."""

    def evaluate(model, x, keys):
        reconstruction = model(x)
        mse = reconstruction_mse(reconstruction, x)
        pixels = reconstruction_mse(normalization.to_pixels(reconstruction), normalization.to_pixels(x))
        return {"loss": mse, "mse": mse, "mse_pixels": pixels}

    def loss(model, x, keys):
        mse = reconstruction_mse(model(x), x)
        return mse, {}

    return Objective("vanilla", loss, evaluate)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registry entry: how to build the model and its objective from a config."""

    name: str
    build_model: Callable[[Any, int, nnx.Rngs], nnx.Module]
    build_objective: Callable[[Any, Normalization], Objective]
    description: str


def _build_autoencoder(config: Any, input_dim: int, rngs: nnx.Rngs) -> nnx.Module:
    return models.Autoencoder(input_dim, tuple(config.hidden_dims), config.latent_dim, init=config.init, rngs=rngs)


VARIANTS: dict[str, Variant] = {
    "vanilla": Variant("vanilla", _build_autoencoder, vanilla_objective, "the document's MLP autoencoder, MSE loss"),
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise JaxaeError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
