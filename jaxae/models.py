"""Flax NNX modules: the document's autoencoder and its relatives. No training code here.

Attribute structure mirrors the PyTorch modules (``encoder``/``decoder`` sequences whose
layer indices match ``nn.Sequential``'s), so converting weights is a rename plus a
transpose. ``init="torch"`` reproduces ``torch.nn.Linear``'s default initialisation
(weights and biases uniform in +-1/sqrt(fan_in)); ``init="flax"`` keeps Flax's defaults
(LeCun-normal weights, zero biases).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxae.errors import JaxaeError

INITS = ("torch", "flax")

# torch.nn.Linear draws W ~ kaiming_uniform(a=sqrt(5)), i.e. U(-b, b) with b = 1/sqrt(fan_in);
# variance_scaling(1/3, fan_in, uniform) has limit sqrt(3 * (1/3) / fan_in): the same bound.
torch_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """torch's bias default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(in_features: int, out_features: int, *, init: str, rngs: nnx.Rngs) -> nnx.Linear:
    """An ``nnx.Linear`` initialised like ``torch.nn.Linear`` (``init="torch"``) or like Flax."""
    if init == "torch":
        return nnx.Linear(
            in_features,
            out_features,
            kernel_init=torch_kernel_init,
            bias_init=torch_bias_init(in_features),
            rngs=rngs,
        )
    if init == "flax":
        return nnx.Linear(in_features, out_features, rngs=rngs)
    raise JaxaeError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def mlp_layers(dims: Sequence[int], *, init: str, rngs: nnx.Rngs) -> list:
    """Linear, ReLU, Linear, ..., Linear: the layer list of one of the document's Sequentials."""
    layers: list = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i:
            layers.append(jax.nn.relu)
        layers.append(linear(d_in, d_out, init=init, rngs=rngs))
    return layers


def flatten_images(x: jax.Array, input_dim: int) -> jax.Array:
    """[N, 28, 28, 1] or [N, 784] -> [N, 784], with a clear error for anything else."""
    if x.ndim < 1 or math.prod(x.shape[1:]) != input_dim or x.ndim == 1:
        raise JaxaeError(
            f"expected a batch of inputs of shape [N, {input_dim}] (or [N, H, W, C] with "
            f"H*W*C = {input_dim}), got shape {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], input_dim)


class Autoencoder(nnx.Module):
    """The document's MLP autoencoder.

    Encoder ``784-128-64-32`` with ReLU between layers (the code is linear); decoder
    ``32-64-128-784`` with ReLU between layers and a final Sigmoid. ``encoder.layers[i]``
    corresponds to the PyTorch ``encoder[i]`` (ReLUs sit at the odd indices, as there).

    Args:
        input_dim: flattened image size.
        hidden_dims: encoder hidden widths; the decoder mirrors them.
        latent_dim: code size.
        init: ``"torch"`` (``torch.nn.Linear`` defaults) or ``"flax"``.
        rngs: parameter rngs.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (128, 64),
        latent_dim: int = 32,
        *,
        init: str = "torch",
        rngs: nnx.Rngs,
    ):
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        dims = (input_dim, *hidden_dims, latent_dim)
        self.encoder = nnx.Sequential(*mlp_layers(dims, init=init, rngs=rngs))
        self.decoder = nnx.Sequential(*mlp_layers(dims[::-1], init=init, rngs=rngs), jax.nn.sigmoid)

    def encode(self, x: jax.Array) -> jax.Array:
        """Images ``[N, 784]`` (or ``[N, 28, 28, 1]``) -> codes ``[N, latent_dim]``."""
        return self.encoder(flatten_images(x, self.input_dim))

    def decode(self, z: jax.Array) -> jax.Array:
        """Codes ``[N, latent_dim]`` -> reconstructions ``[N, 784]`` in (0, 1)."""
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))
